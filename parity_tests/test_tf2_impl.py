"""tf2_impl: the three Keras model-building APIs and the two training loops compute the
same thing; shapes and weights; checkpoints; the entry points, their flags, resume
and bad input.

Fast by design: tiny data, few epochs, in-process ``main()`` runs; subprocesses only
where a real process matters (SIGINT, --deterministic across processes).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common import config
from common.datasets import batch_indices, load_dataset
from common.runner import TrainingRun, run_main
from common.weights import save_weights
from tf2_impl import run_cnn, run_cnn_keras, run_nn, run_nn_keras, train
from tf2_impl.models import APIS, build_cnn, build_mlp, export_weights, import_weights

REPO = Path(__file__).resolve().parents[1]
LOOPS = ("fit", "tape")
DIGITS = (8, 8, 1)
CIFAR = (32, 32, 3)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """TrainingRun.epochs() installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "image", seed=0)


@pytest.fixture(scope="module")
def friedman():
    return load_dataset("friedman", "tabular", seed=0)


def _build(task, api, input_shape=DIGITS, num_classes=10):
    if task == "classification":
        return build_cnn(api, input_shape, num_classes)
    return build_mlp(api, input_shape[-1])


def _random_shared_weights(task, input_shape, num_classes=10, seed=0):
    """Shared-format tensors with non-trivial BN statistics (not the 0/1 defaults)."""
    rng = np.random.default_rng(seed)
    shapes = (config.cnn_parameter_shapes(input_shape, num_classes) if task == "classification"
              else config.mlp_parameter_shapes(input_shape[-1]))
    tensors = {k: rng.normal(0, 0.2, size=s).astype(np.float32) for k, s in shapes.items()}
    for k in tensors:
        if k.endswith("running_var"):
            tensors[k] = rng.uniform(0.5, 2.0, size=shapes[k]).astype(np.float32)
    return tensors


def _layer_output_shapes(model, x):
    """{layer name: [output shape per call]} of one forward pass, in any API: each
    layer's ``call`` is wrapped for the duration of the pass."""
    shapes = {}
    for layer in model.layers:
        def recording(*args, _layer=layer, _call=layer.call, **kwargs):
            out = _call(*args, **kwargs)
            shapes.setdefault(_layer.name, []).append(tuple(out.shape))
            return out
        object.__setattr__(layer, "call", recording)
    try:
        out = model(x, training=False)
    finally:
        for layer in model.layers:
            object.__delattr__(layer, "call")
    return shapes, tuple(out.shape)


def _main_in_process(main, argv):
    """Run an entry point the way the command line does; returns the exit code."""
    try:
        run_main(main, argv)
    except SystemExit as exc:
        return exc.code
    return 0


# -- shapes and weights ---------------------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_cnn_layer_and_model_output_shapes(api):
    model = build_cnn(api, DIGITS, 10)
    shapes, out = _layer_output_shapes(model, np.zeros((4, *DIGITS), np.float32))
    assert out == (4, 10)
    f1, f2, f3 = config.CNN_FILTERS
    expected = {"conv1": [(4, 8, 8, f1)], "bn1": [(4, 8, 8, f1)],
                "conv2": [(4, 4, 4, f2)], "bn2": [(4, 4, 4, f2)],
                "conv3": [(4, 2, 2, f3)], "bn3": [(4, 2, 2, f3)],
                "flatten": [(4, f3)], "fc1": [(4, 100)], "dropout": [(4, 100)],
                "fc2": [(4, 100)], "fc3": [(4, 10)]}
    pools = [(4, 4, 4, f1), (4, 2, 2, f2), (4, 1, 1, f3)]
    if api == "subclassing":  # one pooling layer called three times, ReLU as an op
        expected["pool"] = pools
    else:
        expected.update({f"pool{i}": [p] for i, p in enumerate(pools, start=1)})
        expected.update({f"relu{i}": [p] for i, p in enumerate(pools, start=1)})
    assert shapes == expected


@pytest.mark.parametrize("api", APIS)
def test_mlp_layer_and_model_output_shapes(api):
    model = build_mlp(api, 10)
    shapes, out = _layer_output_shapes(model, np.zeros((5, 10), np.float32))
    assert out == (5, 1)
    assert shapes == {"fc1": [(5, 100)], "fc2": [(5, 100)], "fc3": [(5, 1)]}


def test_fused_batch_norm_layer_matches_torch_batch_norm():
    """tf2_impl's fused BatchNormalization against torch's BatchNorm2d on one training
    batch: outputs, input and scale gradients, and the moving statistics (unbiased
    variance, as torch folds it in). At inference it is the plain Keras layer."""
    import torch
    import torch.nn.functional as F

    from tf2_impl.models import _batch_norm

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (8, 5, 5, 6)).astype(np.float32)  # n = 8*5*5 per channel
    gamma = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    weights = np.arange(6, dtype=np.float32)  # a loss that weighs channels differently
    bn = _batch_norm("bn1")
    bn.build(x.shape)
    bn.gamma.assign(gamma)
    x_tf = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        y = bn(x_tf, training=True)
        loss = tf.reduce_sum(tf.square(y) * weights)
    grad_x, grad_gamma = tape.gradient(loss, [x_tf, bn.gamma])

    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()  # NHWC -> NCHW
    gamma_t = torch.from_numpy(gamma).requires_grad_()
    running_mean, running_var = torch.zeros(6), torch.ones(6)
    y_t = F.batch_norm(x_t, running_mean, running_var, gamma_t, torch.zeros(6), training=True,
                       momentum=config.BN_MOMENTUM, eps=config.BN_EPS)
    (y_t.square() * torch.from_numpy(weights).view(1, 6, 1, 1)).sum().backward()

    nhwc = (0, 2, 3, 1)
    np.testing.assert_allclose(y.numpy(), y_t.detach().permute(*nhwc).numpy(), atol=1e-5)
    np.testing.assert_allclose(grad_x.numpy(), x_t.grad.permute(*nhwc).numpy(), atol=1e-4)
    np.testing.assert_allclose(grad_gamma.numpy(), gamma_t.grad.numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), running_var.numpy(), rtol=1e-6)
    biased = 0.9 + 0.1 * x.astype(np.float64).var(axis=(0, 1, 2))
    assert np.all(np.abs(bn.moving_variance.numpy() - biased) > 1e-3)  # not Keras's biased one

    inference = bn(x_tf, training=False).numpy()
    expected = gamma * (x - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + config.BN_EPS)
    np.testing.assert_allclose(inference, expected, atol=1e-5)



def test_broadcast_bias_conv_matches_the_keras_conv_layer():
    """tf2_impl's conv layer against ``layers.Conv2D`` with the same weights: the same
    variables, outputs and gradients (kernel, bias, input); only the bias add differs."""
    from keras import layers

    from tf2_impl.models import BroadcastBiasConv2D, _conv

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 9, 9, 3)).astype(np.float32))
    ours, keras_conv = _conv(5, "conv1"), layers.Conv2D(5, config.CNN_KERNEL, padding="same")
    ours.build(x.shape)
    keras_conv.build(x.shape)
    assert [v.path.split("/")[-1] for v in ours.weights] == ["kernel", "bias"]
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    for layer in (ours, keras_conv):
        layer.kernel.assign(kernel)
        layer.bias.assign(np.arange(5, dtype=np.float32) - 2.0)
    weights = tf.constant(np.arange(5, dtype=np.float32))  # channels weighed differently

    def outputs_and_gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.nn.relu(y) * weights)
        return [y] + tape.gradient(loss, [layer.kernel, layer.bias, x])

    for a, b in zip(outputs_and_gradients(ours), outputs_and_gradients(keras_conv)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)

    no_bias = BroadcastBiasConv2D(5, config.CNN_KERNEL, padding="same", use_bias=False)
    no_bias.build(x.shape)
    no_bias.kernel.assign(kernel)
    np.testing.assert_allclose(no_bias(x).numpy(), (keras_conv(x) - keras_conv.bias).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("api", APIS)
def test_cnn_weights_are_keras_layouts_and_export_to_shared_shapes(api):
    model = build_cnn(api, CIFAR, 10)
    weights = {f"{layer.name}/{w.name}": tuple(w.shape)
               for layer in model.layers for w in layer.weights}
    expected = {}
    in_ch = 3
    for i, out_ch in enumerate(config.CNN_FILTERS, start=1):
        expected[f"conv{i}/kernel"] = (3, 3, in_ch, out_ch)  # (kh, kw, in, out)
        expected[f"conv{i}/bias"] = (out_ch,)
        for p in ("gamma", "beta", "moving_mean", "moving_variance"):
            expected[f"bn{i}/{p}"] = (out_ch,)
        in_ch = out_ch
    for i, (n_in, n_out) in enumerate([(32 * 4 * 4, 100), (100, 100), (100, 10)], start=1):
        expected[f"fc{i}/kernel"] = (n_in, n_out)  # (in, out)
        expected[f"fc{i}/bias"] = (n_out,)
    assert weights == expected
    assert len(model.trainable_weights) == 18 and len(model.non_trainable_weights) == 6
    exported = export_weights(model)
    assert {k: v.shape for k, v in exported.items()} == config.cnn_parameter_shapes(CIFAR, 10)
    assert all(v.dtype == np.float32 for v in exported.values())


@pytest.mark.parametrize("api", APIS)
def test_mlp_weights_are_keras_layouts_and_export_to_shared_shapes(api):
    model = build_mlp(api, 10)
    weights = {f"{layer.name}/{w.name}": tuple(w.shape)
               for layer in model.layers for w in layer.weights}
    assert weights == {"fc1/kernel": (10, 100), "fc1/bias": (100,), "fc2/kernel": (100, 100),
                       "fc2/bias": (100,), "fc3/kernel": (100, 1), "fc3/bias": (1,)}
    exported = export_weights(model)
    assert {k: v.shape for k, v in exported.items()} == config.mlp_parameter_shapes(10)


# -- the three APIs compute the same function ------------------------------------------------
@pytest.mark.parametrize("task,input_shape", [("classification", CIFAR), ("classification", DIGITS),
                                              ("regression", (10,))])
def test_apis_give_the_same_outputs_with_the_same_weights(task, input_shape):
    tensors = _random_shared_weights(task, input_shape)
    x = np.random.default_rng(1).normal(size=(16, *input_shape)).astype(np.float32)
    outputs = {}
    for api in APIS:
        model = _build(task, api, input_shape)
        import_weights(model, tensors)
        inference = model(x, training=False).numpy()
        train.reseed_dropout(model, 7)  # the same dropout masks in every API
        training = model(x, training=True).numpy()  # batch statistics, dropout on
        outputs[api] = (inference, training, export_weights(model))
    ref_inference, ref_training, _ = outputs["subclassing"]
    if task == "classification":  # training=True took effect (the MLP has no BN/dropout)
        assert not np.allclose(ref_inference, ref_training)
    for api, (inference, training, exported) in outputs.items():
        np.testing.assert_allclose(inference, ref_inference, rtol=0, atol=1e-6, err_msg=api)
        np.testing.assert_allclose(training, ref_training, rtol=0, atol=1e-6, err_msg=api)
        # training=True updated the moving statistics the same way everywhere
        for name, array in outputs["subclassing"][2].items():
            np.testing.assert_allclose(exported[name], array, rtol=0, atol=1e-6, err_msg=name)


def test_export_import_round_trip_through_a_weights_file(tmp_path):
    tensors = _random_shared_weights("classification", DIGITS)
    source = build_cnn("functional", DIGITS, 10)
    import_weights(source, tensors)
    for name, array in export_weights(source).items():
        np.testing.assert_array_equal(array, tensors[name], err_msg=name)
    path = tmp_path / "weights.safetensors"
    save_weights(path, export_weights(source), {"task": "classification"})
    from common.weights import load_weights
    loaded, meta = load_weights(path, "classification", DIGITS, 10)
    target = build_cnn("sequential", DIGITS, 10)
    import_weights(target, loaded)
    x = np.random.default_rng(2).normal(size=(8, *DIGITS)).astype(np.float32)
    np.testing.assert_array_equal(target(x, training=False).numpy(),
                                  source(x, training=False).numpy())


def test_cnn_matches_the_torch_twin_with_the_same_shared_weights():
    """The fc1 row permutation and kernel layouts are right: a wrong one still fits the
    shapes but computes something else."""
    torch_models = pytest.importorskip("torch_impl.models")
    import torch
    from common.layout import nhwc_to_nchw
    tensors = _random_shared_weights("classification", CIFAR)
    keras_model = build_cnn("subclassing", CIFAR, 10)
    import_weights(keras_model, tensors)
    torch_model = torch_models.CNNClassifier(CIFAR, 10)
    torch_models.import_weights(torch_model, tensors)
    torch_model.eval()
    x = np.random.default_rng(3).normal(size=(8, *CIFAR)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(nhwc_to_nchw(x))).numpy()
    np.testing.assert_allclose(keras_model(x, training=False).numpy(), expected,
                               rtol=1e-4, atol=1e-4)


# -- fit and the custom loop train the same way -----------------------------------------------
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_fit_and_tape_loop_give_the_same_weights_after_one_epoch(task, digits, friedman):
    data = digits if task == "classification" else friedman
    x, y = data.x_train[:600], data.y_train[:600]
    if task == "regression":
        y = y.reshape(-1, 1)
    start = _random_shared_weights(task, data.input_shape)
    results = {}
    for loop in LOOPS:
        model = _build(task, "functional", data.input_shape)
        import_weights(model, start)
        optimizer = train.make_optimizer(1e-3)
        optimizer.build(model.trainable_variables)
        train.reseed_dropout(model, 11)  # dropout stays on: both loops draw the same masks
        if loop == "fit":
            train.compile_model(model, optimizer, task)
            history = model.fit(x, y, batch_size=100, epochs=1, shuffle=False, verbose=0)
            loss = history.history["loss"][0]
        else:
            step, metrics = train.make_train_step(model, optimizer, task, data.input_shape)
            batches = batch_indices(len(x), 100, seed=0, epoch=1, shuffle=False)
            loss = train.train_one_epoch(step, metrics, train.as_tensor(x), train.as_tensor(y),
                                         batches)["loss"]
        results[loop] = (loss, export_weights(model))
    assert int(optimizer.iterations) == 6
    np.testing.assert_allclose(results["fit"][0], results["tape"][0], rtol=1e-5)
    moved = False
    for name, array in results["tape"][1].items():
        # A conv bias feeding batch norm has a zero gradient up to rounding, and Adam scales
        # that noise up to steps of size lr: those biases (and the running means that
        # include them) agree only to lr * steps.
        noisy = name.startswith("conv") and name.endswith("bias") or name.endswith("running_mean")
        atol = 6 * 1e-3 if noisy else 1e-6
        np.testing.assert_allclose(results["fit"][1][name], array, rtol=1e-5, atol=atol,
                                   err_msg=name)
        moved |= not np.allclose(array, start[name])
    assert moved


def test_fit_pipeline_yields_the_shared_batches_epoch_after_epoch():
    x = np.arange(25, dtype=np.float32).reshape(25, 1)
    y = np.arange(25, dtype=np.int64)
    got = [b[1].numpy() for b in train.fit_batches(x, y, 10, seed=3, epochs=range(2, 4))]
    expected = batch_indices(25, 10, 3, 2) + batch_indices(25, 10, 3, 3)
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_reseeding_dropout_repeats_the_masks():
    model = build_cnn("subclassing", DIGITS, 10)
    x = np.ones((4, *DIGITS), np.float32)
    train.reseed_dropout(model, 5)
    a = model(x, training=True).numpy()
    b = model(x, training=True).numpy()  # the generator moved on: other masks
    train.reseed_dropout(model, 5)
    np.testing.assert_array_equal(model(x, training=True).numpy(), a)
    assert not np.array_equal(a, b)


# -- the entry points: every task x API x loop, trained once for the tests below ---------------
# Each combination runs through the entry point whose default loop it uses, with --api given
# only when it differs from that entry point's default, so the defaults are exercised too.
TASKS = {
    "classification": {"fit": run_cnn_keras, "tape": run_cnn,
                       "argv": ["--dataset", "digits", "--epochs", "5"]},
    "regression": {"fit": run_nn_keras, "tape": run_nn,
                   "argv": ["--dataset", "friedman", "--epochs", "10", "--lr", "0.01"]},
}
DEFAULT_API = {run_nn: "subclassing", run_nn_keras: "sequential", run_cnn: "subclassing",
               run_cnn_keras: "functional"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{(task, api, loop): output directory} of twelve short in-process runs."""
    root = tmp_path_factory.mktemp("tf2_runs")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    outs = {}
    for task, spec in TASKS.items():
        for loop in LOOPS:
            module = spec[loop]
            for api in APIS:
                out = root / f"{task}-{api}-{loop}"
                flags = [] if api == DEFAULT_API[module] else ["--api", api]
                module.main(spec["argv"] + flags + ["--out", str(out)])
                outs[task, api, loop] = out
    for s, handler in saved.items():
        signal.signal(s, handler)
    return outs


def _metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.mark.parametrize("task", list(TASKS))
def test_every_api_and_loop_learns_and_they_agree(task, trained):
    """Each of the six combinations learns; and since the same seed gives the same initial
    weights in every API and both loops train on the same batches, they end close together."""
    key = "accuracy" if task == "classification" else "r2"
    scores = {(api, loop): _metrics(trained[task, api, loop])["test"][key]
              for api in APIS for loop in LOOPS}
    assert min(scores.values()) >= (0.90 if task == "classification" else 0.85), scores
    assert max(scores.values()) - min(scores.values()) <= 0.02, scores


@pytest.mark.parametrize("task,api,loop", [(t, a, lp) for t in TASKS for a in APIS for lp in LOOPS])
def test_entry_points_write_their_outputs_and_honour_the_flags(task, api, loop, trained):
    out = trained[task, api, loop]
    for name in ("metrics.json", "predictions.csv", "curves.png", "run.log", "weights.safetensors",
                 "run_config.json", "checkpoint/state.json"):
        assert (out / name).is_file(), name
    metrics = _metrics(out)
    module = TASKS[task][loop]
    assert (metrics["implementation"], metrics["entry_point"]) == ("tf2", module.MODULE)
    assert (metrics["api"], metrics["loop"]) == (api, loop)
    argv = TASKS[task]["argv"]
    epochs = int(argv[argv.index("--epochs") + 1])
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, epochs + 1))
    kind = "cnn" if task == "classification" else "mlp"
    name = {"cnn": "cnn_classifier", "mlp": "mlp_regressor"}[kind] if api == "subclassing" \
        else f"{kind}_{api}"
    assert f"model {name} ({api} API" in (out / "run.log").read_text()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["best_checkpoint"].endswith(".weights.h5")
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert state["last_checkpoint"] + ".index" in files
    assert len(files) == 4  # state.json, best .weights.h5, last .index and .data: older ones pruned
    dataset = argv[argv.index("--dataset") + 1]
    n_test = len(load_dataset(dataset, "image" if kind == "cnn" else "tabular", seed=0).x_test)
    assert len((out / "predictions.csv").read_text().splitlines()) == n_test + 1


@pytest.mark.parametrize("task,loop", [("classification", "fit"), ("regression", "tape")])
def test_eval_only_reproduces_the_test_metrics_from_the_weights_file(task, loop, trained, tmp_path):
    out = trained[task, DEFAULT_API[TASKS[task][loop]], loop]
    argv = TASKS[task]["argv"][:2]  # the dataset
    TASKS[task][loop].main(argv + ["--eval-only", "--weights", str(out / "weights.safetensors"),
                                   "--out", str(tmp_path / "eval")])
    evaluated, original = _metrics(tmp_path / "eval"), _metrics(out)
    assert evaluated["epochs"] == []
    for key, value in original["test"].items():
        assert evaluated["test"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_seed_flag_changes_the_run(trained, tmp_path):
    argv = TASKS["classification"]["argv"]
    run_cnn_keras.main(argv + ["--seed", "1", "--out", str(tmp_path / "seed1")])
    other = (tmp_path / "seed1" / "predictions.csv").read_text()
    assert other != (trained["classification", "functional", "fit"] / "predictions.csv").read_text()


@pytest.mark.parametrize("loop", LOOPS)
def test_interrupt_after_epoch_one_and_resume_equals_the_uninterrupted_run(loop, trained, tmp_path,
                                                                           monkeypatch):
    """A real SIGINT, sent to this process as epoch 1 ends, stops the run in epoch 2;
    --resume finishes it with the predictions of the run that was never stopped."""
    module = TASKS["classification"][loop]
    straight = trained["classification", DEFAULT_API[module], loop]
    end_epoch = TrainingRun.end_epoch

    def end_epoch_then_sigint(self, epoch, *args):
        result = end_epoch(self, epoch, *args)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    monkeypatch.setattr(TrainingRun, "end_epoch", end_epoch_then_sigint)
    stopped = tmp_path / "stopped"
    argv = TASKS["classification"]["argv"] + ["--out", str(stopped)]
    assert _main_in_process(module.main, argv) == 130
    state = json.loads((stopped / "checkpoint" / "state.json").read_text())
    assert len(state["history"]) == 1
    monkeypatch.setattr(TrainingRun, "end_epoch", end_epoch)

    module.main(["--resume", str(stopped)])
    assert (stopped / "predictions.csv").read_text() == (straight / "predictions.csv").read_text()
    history, straight_history = _metrics(stopped)["epochs"], _metrics(straight)["epochs"]
    assert [e["epoch"] for e in history] == [e["epoch"] for e in straight_history]
    assert [e["val_loss"] for e in history] == [e["val_loss"] for e in straight_history]


def _cli(module, *args):
    return [sys.executable, "-m", module, *args]


def test_sigint_to_a_subprocess_then_resume_matches_an_uninterrupted_deterministic_run(tmp_path):
    """The command line end to end: Ctrl-C in epoch 2 exits 130, --resume completes, and the
    predictions equal those of an uninterrupted run in another process, bit for bit
    (--deterministic)."""
    args = ["--dataset", "digits", "--epochs", "5", "--deterministic"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def start(out, **streams):
        return subprocess.Popen(_cli("tf2_impl.run_cnn_keras", *args, "--out", str(tmp_path / out)),
                                cwd=REPO, env=env, text=True, **streams)
    with open(tmp_path / "straight.err", "w") as err:
        straight = start("straight", stdout=subprocess.DEVNULL, stderr=err)
        stopped = start("stopped", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for line in stopped.stdout:
            if "epoch 1/5:" in line:  # the summary line of epoch 1: epoch 2 starts now
                stopped.send_signal(signal.SIGINT)
                break
        stopped.stdout.read()
        assert stopped.wait(timeout=300) == 130
        state = json.loads((tmp_path / "stopped" / "checkpoint" / "state.json").read_text())
        assert 1 <= len(state["history"]) < 5
        resume = _cli("tf2_impl.run_cnn_keras", "--resume", str(tmp_path / "stopped"))
        resumed = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resuming" in resumed.stdout
        assert straight.wait(timeout=300) == 0, (tmp_path / "straight.err").read_text()[-2000:]
    assert (tmp_path / "stopped" / "predictions.csv").read_text() == \
        (tmp_path / "straight" / "predictions.csv").read_text()


# -- bad input: one sentence, the documented exit code --------------------------------------------
def _expect_exit(capsys, main, argv, code, *words):
    assert _main_in_process(main, argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def test_weights_of_another_model_or_not_weights_at_all_exit_2(tmp_path, capsys):
    mlp = tmp_path / "mlp.safetensors"
    save_weights(mlp, export_weights(build_mlp("sequential", 10)), {"task": "regression"})
    _expect_exit(capsys, run_cnn.main, ["--dataset", "digits", "--eval-only", "--weights", str(mlp),
                                        "--out", str(tmp_path / "o1")], 2, "mlp.safetensors")
    cifar_shaped = tmp_path / "cifar.safetensors"
    save_weights(cifar_shaped, export_weights(build_cnn("functional", CIFAR, 10)),
                 {"task": "classification"})
    _expect_exit(capsys, run_cnn_keras.main, ["--dataset", "digits", "--eval-only", "--weights",
                                              str(cifar_shaped), "--out", str(tmp_path / "o2")],
                 2, "conv1.weight", "(32, 1, 3, 3)")
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("not a weights file")
    _expect_exit(capsys, run_nn.main, ["--dataset", "diabetes", "--weights", str(foreign),
                                       "--out", str(tmp_path / "o3")], 2, "notes.safetensors")


def test_eval_only_without_weights_exits_2(tmp_path, capsys):
    _expect_exit(capsys, run_nn_keras.main, ["--eval-only", "--out", str(tmp_path / "o")], 2,
                 "--weights")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is present")
def test_device_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    _expect_exit(capsys, run_cnn.main, ["--device", "cuda", "--out", str(tmp_path / "o")], 2,
                 "--device cpu")


@pytest.mark.parametrize("module,loop", [(run_nn, "tape"), (run_nn_keras, "fit"),
                                         (run_cnn, "tape"), (run_cnn_keras, "fit")])
def test_huge_learning_rate_stops_with_exit_3(module, loop, tmp_path, capsys):
    dataset = "digits" if module in (run_cnn, run_cnn_keras) else "diabetes"
    assert _main_in_process(module.main, ["--dataset", dataset, "--lr", "1e9", "--epochs", "2",
                                           "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert "loss became" in err and "--lr" in err
