"""tf2_impl's models and training pieces: the three Keras model-building APIs compute the
same thing with stock layers; shapes and the shared weights format; the two feeds give the
shared batches; fit and the GradientTape loop train alike; dropout seeds. Checkpoints and
the entry points are tested in ``test_tf2_runs.py``.

Fast by design: tiny inputs, one epoch at most, all in this process.
"""
import keras
import numpy as np
import pytest

from common import config
from common.datasets import batch_indices, load_dataset
from common.weights import load_weights, save_weights
from parity_tests.conftest import random_shared_weights
from tf2_impl import train
from tf2_impl.models import APIS, build_cnn, build_mlp, export_weights, import_weights

DIGITS = (8, 8, 1)
CIFAR = (32, 32, 3)


def _build(task, api, input_shape=DIGITS, num_classes=10):
    if task == "classification":
        return build_cnn(input_shape, num_classes, api)
    return build_mlp(input_shape[-1], api)


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


# -- the models: stock layers, shapes, weights ---------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_cnn_is_built_from_stock_keras_layers_in_the_textbook_order(api):
    model = build_cnn(DIGITS, 10, api)
    assert all(type(layer).__module__.startswith("keras.src.layers") for layer in model.layers)
    shapes, out = _layer_output_shapes(model, np.zeros((4, *DIGITS), np.float32))
    assert out == (4, 10)
    f1, f2, f3 = config.CNN_FILTERS
    maps = [(4, 8, 8, f1), (4, 4, 4, f2), (4, 2, 2, f3)]
    pools = [(4, 4, 4, f1), (4, 2, 2, f2), (4, 1, 1, f3)]
    expected = {"flatten": [(4, f3)], "fc1": [(4, 100)], "dropout": [(4, 100)],
                "fc2": [(4, 100)], "fc3": [(4, 10)]}
    for i, (full, pooled) in enumerate(zip(maps, pools), start=1):
        expected.update({f"conv{i}": [full], f"bn{i}": [full]})
        if api != "subclassing":  # its ReLU is an op and one pooling layer serves 3 blocks
            expected.update({f"relu{i}": [full], f"pool{i}": [pooled]})
    if api == "subclassing":
        expected["pool"] = pools
    else:  # conv -> batch norm -> ReLU -> pool
        names = [layer.name for layer in model.layers if layer.name != "images"]
        assert names[:4] == ["conv1", "bn1", "relu1", "pool1"]
    assert shapes == expected
    for i in range(1, 4):
        conv, bn = model.get_layer(f"conv{i}"), model.get_layer(f"bn{i}")
        assert (conv.use_bias, conv.padding, conv.kernel_size) == (False, "same", (3, 3))
        assert bn.epsilon == config.BN_EPS
        assert bn.momentum == pytest.approx(1 - config.BN_MOMENTUM)


@pytest.mark.parametrize("api", APIS)
def test_mlp_layer_and_model_output_shapes(api):
    model = build_mlp(10, api)
    shapes, out = _layer_output_shapes(model, np.zeros((5, 10), np.float32))
    assert out == (5, 1)
    assert shapes == {"fc1": [(5, 100)], "fc2": [(5, 100)], "fc3": [(5, 1)]}


@pytest.mark.parametrize("api", APIS)
def test_cnn_weights_are_keras_layouts_and_export_to_shared_shapes(api):
    model = build_cnn(CIFAR, 10, api)
    weights = {f"{layer.name}/{w.name}": tuple(w.shape)
               for layer in model.layers for w in layer.weights}
    expected = {}
    in_ch = 3
    for i, out_ch in enumerate(config.CNN_FILTERS, start=1):
        expected[f"conv{i}/kernel"] = (3, 3, in_ch, out_ch)  # (kh, kw, in, out); no bias
        for p in ("gamma", "beta", "moving_mean", "moving_variance"):
            expected[f"bn{i}/{p}"] = (out_ch,)
        in_ch = out_ch
    for i, (n_in, n_out) in enumerate([(32 * 4 * 4, 100), (100, 100), (100, 10)], start=1):
        expected[f"fc{i}/kernel"] = (n_in, n_out)  # (in, out)
        expected[f"fc{i}/bias"] = (n_out,)
    assert weights == expected
    assert len(model.trainable_weights) == 15 and len(model.non_trainable_weights) == 6
    exported = export_weights(model)
    assert {k: v.shape for k, v in exported.items()} == config.cnn_parameter_shapes(CIFAR, 10)
    assert all(v.dtype == np.float32 for v in exported.values())


@pytest.mark.parametrize("api", APIS)
def test_mlp_weights_are_keras_layouts_and_export_to_shared_shapes(api):
    model = build_mlp(10, api)
    weights = {f"{layer.name}/{w.name}": tuple(w.shape)
               for layer in model.layers for w in layer.weights}
    assert weights == {"fc1/kernel": (10, 100), "fc1/bias": (100,), "fc2/kernel": (100, 100),
                       "fc2/bias": (100,), "fc3/kernel": (100, 1), "fc3/bias": (1,)}
    exported = export_weights(model)
    assert {k: v.shape for k, v in exported.items()} == config.mlp_parameter_shapes(10)


@pytest.mark.parametrize("task,input_shape", [("classification", CIFAR), ("classification", DIGITS),
                                              ("regression", (10,))])
def test_apis_give_the_same_outputs_with_the_same_weights(task, input_shape):
    tensors = random_shared_weights(task, input_shape)
    x = np.random.default_rng(1).normal(size=(16, *input_shape)).astype(np.float32)
    outputs = {}
    for api in APIS:
        model = _build(task, api, input_shape)
        import_weights(model, tensors)
        inference = model(x, training=False).numpy()
        train.reseed_dropout(model, 7)  # the same dropout masks in every API
        training = model(x, training=True).numpy()  # batch statistics, dropout on
        outputs[api] = (inference, training, export_weights(model))
    ref_inference, ref_training, ref_exported = outputs["subclassing"]
    if task == "classification":  # training=True took effect (the MLP has no BN/dropout)
        assert not np.allclose(ref_inference, ref_training)
    for api, (inference, training, exported) in outputs.items():
        np.testing.assert_allclose(inference, ref_inference, rtol=0, atol=1e-6, err_msg=api)
        np.testing.assert_allclose(training, ref_training, rtol=0, atol=1e-6, err_msg=api)
        for name, array in ref_exported.items():  # the same moving statistics everywhere
            np.testing.assert_allclose(exported[name], array, rtol=0, atol=1e-6, err_msg=name)


def test_export_import_round_trip_through_a_weights_file(tmp_path):
    tensors = random_shared_weights("classification", DIGITS)
    source = build_cnn(DIGITS, 10, "functional")
    import_weights(source, tensors)
    for name, array in export_weights(source).items():
        np.testing.assert_array_equal(array, tensors[name], err_msg=name)
    path = tmp_path / "weights.safetensors"
    save_weights(path, export_weights(source), {"task": "classification"})
    loaded, _ = load_weights(path, "classification", DIGITS, 10)
    target = build_cnn(DIGITS, 10, "sequential")
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
    tensors = random_shared_weights("classification", CIFAR)
    keras_model = build_cnn(CIFAR, 10)
    import_weights(keras_model, tensors)
    torch_model = torch_models.build_cnn(CIFAR, 10)
    torch_models.import_weights(torch_model, tensors)
    torch_model.eval()
    x = np.random.default_rng(3).normal(size=(8, *CIFAR)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(nhwc_to_nchw(x))).numpy()
    np.testing.assert_allclose(keras_model(x, training=False).numpy(), expected,
                               rtol=1e-4, atol=1e-4)


# -- the feeds ------------------------------------------------------------------------------------
def test_tape_batches_are_the_shared_batches_or_in_order():
    x = np.arange(25, dtype=np.float32).reshape(25, 1)
    y = np.arange(25, dtype=np.int64)
    shuffled = [b.numpy() for _, b in train.make_batches(x, y, 10, seed=3, epoch=2)]
    assert [len(b) for b in shuffled] == [10, 10, 5]
    for a, b in zip(shuffled, batch_indices(25, 10, 3, 2)):
        np.testing.assert_array_equal(a, b)
    in_order = np.concatenate([b.numpy() for _, b in train.make_batches(x, y, 10)])
    np.testing.assert_array_equal(in_order, y)


def test_fit_feed_yields_the_shared_batches_of_consecutive_epochs_without_end():
    x = np.arange(25, dtype=np.float32).reshape(25, 1)
    y = np.arange(25, dtype=np.int64)
    feed = train.make_fit_batches(x, y, 10, seed=3, initial_epoch=1)
    assert feed.num_batches is None  # endless: fit is given steps_per_epoch
    expected = batch_indices(25, 10, 3, 2) + batch_indices(25, 10, 3, 3)
    for i, index in enumerate(expected):
        batch_x, batch_y = feed[i]
        np.testing.assert_array_equal(batch_y, index)
        np.testing.assert_array_equal(batch_x[:, 0], index)


def test_keras_fit_asks_an_endless_py_dataset_for_batch_i_counting_across_epochs():
    """Documents Keras 3 behaviour EpochBatches relies on: with steps_per_epoch, one
    iterator serves every epoch of a fit call, so batch i keeps counting; after two
    probes (0 and 1, for the tensor spec) the calls run 0, 1, 2, ... in order."""
    calls = []

    class Recording(train.EpochBatches):
        def __getitem__(self, i):
            calls.append(i)
            return super().__getitem__(i)

    x = np.ones((25, 3), np.float32)
    model = build_mlp(3, "sequential")
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    model.fit(Recording(x, np.ones((25, 1), np.float32), 10, seed=0, initial_epoch=0),
              epochs=3, steps_per_epoch=3, shuffle=False, verbose=0)
    assert calls[:2] == [0, 1]
    assert calls[2:11] == list(range(9))  # prefetching may ask for a few more after that


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_fit_and_the_tape_loop_train_alike_for_two_epochs(task):
    """model.fit over the fit feed and train_one_epoch over the tape feed, from the same
    weights and dropout seeds: the same losses and weights after two epochs."""
    kind = "image" if task == "classification" else "tabular"
    data = load_dataset("digits" if kind == "image" else "friedman", kind, seed=0)
    x, y = data.x_train[:600], data.y_train[:600]
    if task == "regression":
        y = y.reshape(-1, 1)
    start = random_shared_weights(task, data.input_shape)
    results = {}
    for loop in ("fit", "tape"):
        model = _build(task, "functional", data.input_shape)
        import_weights(model, start)
        loss_fn, optimizer = train.make_loss(task), train.make_optimizer(model, 1e-3)
        if loop == "fit":
            reseed = keras.callbacks.LambdaCallback(
                on_epoch_begin=lambda epoch, logs: train.reseed_dropout(model, 11 + epoch))
            model.compile(optimizer=optimizer, loss=loss_fn, metrics=[train.make_metric(task)],
                          jit_compile=False)
            history = model.fit(train.make_fit_batches(x, y, 100, 0, 0), epochs=2,
                                steps_per_epoch=6, shuffle=False, callbacks=[reseed],
                                verbose=0)
            losses = history.history["loss"]
        else:
            step, losses = train.make_train_step(model, loss_fn, optimizer), []
            for epoch in (1, 2):
                train.reseed_dropout(model, 10 + epoch)
                batches = train.make_batches(x, y, 100, seed=0, epoch=epoch)
                losses.append(train.train_one_epoch(step, batches, task)["loss"])
        results[loop] = (losses, export_weights(model))
        assert int(optimizer.iterations) == 12
    np.testing.assert_allclose(results["fit"][0], results["tape"][0], rtol=1e-5)
    for name, array in results["tape"][1].items():
        np.testing.assert_allclose(results["fit"][1][name], array, rtol=1e-4, atol=1e-6,
                                   err_msg=name)
        assert not np.array_equal(array, start[name]), name


def test_reseeding_dropout_repeats_the_masks():
    model = build_cnn(DIGITS, 10)
    x = np.ones((4, *DIGITS), np.float32)
    train.reseed_dropout(model, 5)
    a = model(x, training=True).numpy()
    b = model(x, training=True).numpy()  # the generator moved on: other masks
    train.reseed_dropout(model, 5)
    np.testing.assert_array_equal(model(x, training=True).numpy(), a)
    assert not np.array_equal(a, b)


def test_evaluate_reports_the_split_metrics_and_outputs():
    model = build_mlp(3)
    x = np.random.default_rng(0).normal(size=(25, 3)).astype(np.float32)
    y = np.ones((25, 1), np.float32)
    metrics, outputs = train.evaluate(model, train.make_batches(x, y, 10), train.make_loss(
        "regression"), "regression")
    np.testing.assert_allclose(outputs, model(x).numpy(), rtol=1e-6)
    assert metrics["mse"] == pytest.approx(float(np.mean((outputs - y) ** 2)), rel=1e-5)
