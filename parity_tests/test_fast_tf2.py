"""tf2_impl/fast.py computes the plain code's function: from the same shared weights the
fast CNN gives the plain CNN's outputs (inference and training), gradients, Adam step and
moving statistics in every API; the fast feeds give the plain feeds' batches, the fast
epoch and evaluation the plain numbers; ``--fast`` runs end to end and records
"variant": "fast".

Tolerances are float32's: the fused batch-norm kernel sums in another order than Keras's
separate ops (its kernel takes no float64), so results agree to a few units in the 6th
digit, gradients and moving statistics to 1e-5 relative.
"""
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from common import config
from common.datasets import batch_indices
from parity_tests.conftest import call, metrics, random_shared_weights
from tf2_impl import fast, train
from tf2_impl.models import APIS, build_cnn, build_mlp, export_weights, import_weights

CIFAR = (32, 32, 3)


def _models(api):
    """(plain, fast) CNNs in `api` holding the same shared weights."""
    tensors = random_shared_weights("classification", CIFAR)
    pair = build_cnn(CIFAR, 10, api), fast.build_cnn(CIFAR, 10, api)
    for model in pair:
        import_weights(model, tensors)
    return pair


def test_the_fast_cnn_swaps_only_the_batch_norm_class():
    plain, quick = _models("functional")
    swapped = [layer.name for layer in quick.layers if type(layer) is fast.FusedBatchNormalization]
    assert swapped == ["bn1", "bn2", "bn3"]
    assert [w.path for w in quick.weights] == [w.path for w in plain.weights]
    assert [layer.get_config() for layer in quick.layers] == \
        [layer.get_config() for layer in plain.layers]


@pytest.mark.parametrize("api", APIS)
def test_fast_cnn_outputs_gradients_adam_step_and_moving_statistics_equal_the_plain_ones(api):
    x = tf.constant(np.random.default_rng(1).normal(size=(16, *CIFAR)).astype(np.float32))
    y = tf.constant(np.arange(16) % 10, tf.int64)
    loss_fn = train.make_loss("classification")
    results = {}
    for name, model in zip(("plain", "fast"), _models(api)):
        inference = model(x, training=False).numpy()
        train.reseed_dropout(model, 3)  # the same dropout masks
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = loss_fn(y, outputs)
        gradients = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        moved = export_weights(model)  # the moving statistics after one training pass
        optimizer = train.make_optimizer(model, 1e-3)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        results[name] = inference, outputs.numpy(), gradients, moved, export_weights(model)
    plain, quick = results["plain"], results["fast"]
    np.testing.assert_array_equal(quick[0], plain[0])  # inference is the Keras layer itself
    np.testing.assert_allclose(quick[1], plain[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(quick[2], plain[2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for name, array in plain[3].items():
        np.testing.assert_allclose(quick[3][name], array, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(plain[3]["bn1.running_var"], random_shared_weights(
        "classification", CIFAR)["bn1.running_var"])  # the statistics did move
    # One Adam step moves each weight by lr * g / (|g| + eps) (first step): about lr, but
    # for a gradient within a few eps of 0 a rounding difference in g shows; 2% of lr.
    for name, array in plain[4].items():
        np.testing.assert_allclose(quick[4][name], array, rtol=0, atol=0.02 * 1e-3, err_msg=name)
        if "running" not in name:  # a trainable weight: it moved
            assert not np.allclose(array, plain[3][name], rtol=0, atol=1e-4), name


def test_fused_layer_keeps_keras_biased_moving_variance():
    """The fused kernel returns the unbiased batch variance (library behaviour, shown
    here); the layer averages in the biased one, as ``layers.BatchNormalization`` does."""
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 5, 5, 6)).astype(np.float32)
    n = 8 * 5 * 5
    _, _, kernel_variance = tf.compat.v1.nn.fused_batch_norm(
        x, tf.ones(6), tf.zeros(6), epsilon=config.BN_EPS, is_training=True)
    np.testing.assert_allclose(kernel_variance, x.var(axis=(0, 1, 2), ddof=1), rtol=1e-5)

    keras_bn = layers.BatchNormalization(epsilon=config.BN_EPS, momentum=1 - config.BN_MOMENTUM)
    fused_bn = fast.FusedBatchNormalization(epsilon=config.BN_EPS,
                                            momentum=1 - config.BN_MOMENTUM)
    for bn in (keras_bn, fused_bn):
        bn(x, training=True)
    biased = x.astype(np.float64).var(axis=(0, 1, 2))
    expected = (1 - config.BN_MOMENTUM) * 1.0 + config.BN_MOMENTUM * biased
    np.testing.assert_allclose(keras_bn.moving_variance.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(fused_bn.moving_variance.numpy(), expected, rtol=1e-5)
    # Without the n/(n-1) correction the variance would be larger by exactly this much:
    unbiased_gap = config.BN_MOMENTUM * biased / (n - 1)
    assert np.all(unbiased_gap > 1e-3)


def test_fast_tape_batches_are_the_plain_batches():
    x = np.random.default_rng(0).normal(size=(25, 3)).astype(np.float32)
    y = np.arange(25, dtype=np.int64)
    for kwargs in ({"seed": 3, "epoch": 2}, {}):
        plain = list(train.make_batches(x, y, 10, **kwargs))
        quick = list(fast.make_batches(x, y, 10, **kwargs))
        assert len(quick) == len(plain) == 3
        for (qx, qy), (px, py) in zip(quick, plain):
            np.testing.assert_array_equal(qx.numpy(), px.numpy())
            np.testing.assert_array_equal(qy.numpy(), py.numpy())
    assert fast.make_batches(x, y, 10).x is fast.make_batches(x, y, 10, 0, 1).x  # converted once


def test_fast_fit_feed_gives_the_plain_feeds_batches_epoch_after_epoch():
    x = np.random.default_rng(0).normal(size=(25, 3)).astype(np.float32)
    y = np.arange(25, dtype=np.int64)
    plain = train.make_fit_batches(x, y, 10, seed=3, initial_epoch=4)
    quick = fast.make_fit_batches(x, y, 10, seed=3, initial_epoch=4)
    for i, (qx, qy) in enumerate(quick.take(9)):  # three epochs: 5, 6 and 7
        px, py = plain[i]
        np.testing.assert_array_equal(qx.numpy(), px)
        np.testing.assert_array_equal(qy.numpy(), py)
    np.testing.assert_array_equal(plain[0][1], batch_indices(25, 10, 3, 5)[0])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_fast_epoch_and_evaluation_report_the_plain_numbers(task):
    """fast.train_one_epoch (metrics updated in the traced step) and fast.evaluate (a
    traced inference step) from the same weights and batches: the plain results."""
    shape = CIFAR if task == "classification" else (10,)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(250, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 250) if task == "classification" else \
        rng.normal(size=(250, 1)).astype(np.float32)
    tensors = random_shared_weights(task, shape)
    results = {}
    for variant in (train, fast):
        model = build_cnn(shape, 10) if task == "classification" else build_mlp(shape[-1])
        import_weights(model, tensors)
        loss_fn, optimizer = train.make_loss(task), train.make_optimizer(model, 1e-3)
        step = train.make_train_step(model, loss_fn, optimizer)
        epochs = []
        for epoch in (1, 2):  # the second epoch reuses the traced step and resets the metrics
            train.reseed_dropout(model, epoch)
            epochs.append(variant.train_one_epoch(step, train.make_batches(x, y, 100, 0, epoch),
                                                  task))
        results[variant] = epochs, variant.evaluate(model, train.make_batches(x, y, 100),
                                                    loss_fn, task)
    (plain_epochs, (plain_test, plain_out)), (fast_epochs, (fast_test, fast_out)) = \
        results[train], results[fast]
    for a, b in zip(fast_epochs, plain_epochs):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    np.testing.assert_allclose(fast_out, plain_out, rtol=1e-4, atol=1e-5)
    for key, value in plain_test.items():
        assert fast_test[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("module,argv", [
    ("tf2_impl.run_cnn", ["--dataset", "digits", "--epochs", "2"]),
    ("tf2_impl.run_cnn_keras", ["--dataset", "digits", "--epochs", "2"]),
    ("tf2_impl.run_nn", ["--dataset", "friedman", "--epochs", "2"]),
    ("tf2_impl.run_nn_keras", ["--dataset", "friedman", "--epochs", "2"]),
])
def test_fast_runs_end_to_end_and_trains_like_the_plain_run(module, argv, tmp_path):
    for variant in ("plain", "fast"):
        flags = ["--fast"] if variant == "fast" else []
        assert call(module, argv + flags + ["--out", str(tmp_path / variant)]) == 0
    plain, quick = metrics(tmp_path / "plain"), metrics(tmp_path / "fast")
    assert (plain["variant"], quick["variant"]) == ("plain", "fast")
    assert quick["config"]["fast"] is True
    for a, b in zip(quick["epochs"], plain["epochs"]):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["epoch"], key)
