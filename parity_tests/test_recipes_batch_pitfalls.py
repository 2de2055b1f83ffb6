"""Training-recipe pitfalls in what a batch goes through, between torch, Keras 3 and TF1:
augmentation, label smoothing and mixed precision, one named test each (the optimizer,
schedules and early stopping are in test_recipes_pitfalls.py).

Every test here documents library behaviour, not this project's code: the wrong way (a
library default, or the obvious port) gives different numbers, the right way agrees with
torch and with ``common/recipes.py``. Each docstring names the project test that holds the
shipped implementations to the right way. Figures are from torch 2.15, Keras 3.15.1 and
TensorFlow 2.21 on a CPU; docs/PORTING.md, "Training recipes", explains each one.
"""
import inspect

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as transforms
import tensorflow as tf
import keras

from common.recipes import augment_batch

tf1 = tf.compat.v1
RNG = np.random.default_rng(19)


# -- augmentation --------------------------------------------------------------------------------
def flips(x, out):
    """How many outputs are their input unchanged, mirrored left-right, or rotated 180 degrees."""
    kinds = {"same": 0, "horizontal": 0, "vertical": 0, "both": 0}
    for a, b in zip(x, out):
        for kind, view in (("same", a), ("horizontal", a[:, ::-1]), ("vertical", a[::-1]),
                           ("both", a[::-1, ::-1])):
            kinds[kind] += bool(np.array_equal(view, b))
    return kinds


def test_pitfall_keras_random_flip_default_is_horizontal_and_vertical():
    """Library behaviour: ``keras.layers.RandomFlip()`` defaults to
    ``mode="horizontal_and_vertical"`` and, in Keras 3.15, draws one coin for both axes: 33
    of 64 images came out rotated by 180 degrees, none mirrored left-right only.
    torchvision's ``RandomHorizontalFlip`` (p=0.5) is ``RandomFlip("horizontal")``, the
    mirror this project applies (CIFAR-10 only). Pairs with
    test_recipes_common.py::test_augment_batch_flips_left_right_only_when_allowed,
    test_recipes_tf2.py::test_every_feed_gives_the_shared_augmented_batches."""
    x = RNG.normal(size=(64, 6, 6, 1)).astype(np.float32)
    default = flips(x, keras.layers.RandomFlip(seed=1)(x, training=True).numpy())
    horizontal = flips(x, keras.layers.RandomFlip("horizontal", seed=1)(x, training=True).numpy())
    assert default["vertical"] + default["both"] > 16 and default["horizontal"] == 0
    assert horizontal["vertical"] == horizontal["both"] == 0 and horizontal["horizontal"] > 16


def crop_offsets(padded, out):
    """The (top, left) window of `padded` each output is."""
    h, w = out.shape[1:3]
    return [next((i, j) for i in range(padded.shape[1] - h + 1) for j in range(padded.shape[2] - w + 1)
                 if np.array_equal(p[i:i + h, j:j + w], o)) for p, o in zip(padded, out)]


def test_pitfall_keras_random_crop_one_window_per_batch():
    """Library behaviour: Keras's ``RandomCrop`` has no ``padding`` argument (pad first),
    crops every image of a batch at the same window (all 8 here), and at inference returns
    its input unchanged: the padded 10x10 images, not 8x8 (its docstring promises a centre
    crop). torchvision's ``RandomCrop(padding=1)`` draws a window per call: per sample
    inside a Dataset, one per batch on a batch tensor. ``common.recipes.augment_batch``
    draws one per sample. Pairs with
    test_recipes_common.py::test_augment_batch_crops_each_sample_on_its_own,
    test_recipes_torch.py::test_augmented_batches_are_the_shared_ones,
    test_recipes_tf2.py::test_every_feed_gives_the_shared_augmented_batches,
    test_recipes_tf1.py::test_augmented_batches_are_torch_ones."""
    assert "padding" not in inspect.signature(keras.layers.RandomCrop).parameters
    x = RNG.normal(size=(8, 8, 8, 1)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    crop = keras.layers.RandomCrop(8, 8, seed=3)
    assert len(set(crop_offsets(padded, crop(padded, training=True).numpy()))) == 1
    assert np.array_equal(crop(padded, training=False).numpy(), padded)
    torch.manual_seed(0)
    nchw = torch.tensor(padded[..., 0])[:, None]
    crop_t = transforms.RandomCrop(8)
    per_sample = torch.stack([crop_t(image) for image in nchw])[:, 0, ..., None].numpy()
    per_batch = crop_t(nchw)[:, 0, ..., None].numpy()
    assert len(set(crop_offsets(padded, per_sample))) > 1
    assert len(set(crop_offsets(padded, per_batch))) == 1
    assert len(set(crop_offsets(padded, augment_batch(x, 0, 1, 0, False)))) > 1


# -- label smoothing -----------------------------------------------------------------------------
def test_pitfall_sparse_crossentropy_has_no_label_smoothing():
    """Library behaviour: torch's ``cross_entropy(label_smoothing=0.1)`` takes integer
    targets; Keras's ``SparseCategoricalCrossentropy`` and TF1's
    ``sparse_softmax_cross_entropy`` have no ``label_smoothing`` (a TypeError; dropping it
    leaves a loss 0.067 higher here). ``CategoricalCrossentropy(label_smoothing=0.1)`` and
    TF1's ``softmax_cross_entropy`` on one-hot targets agree with torch to 1e-6. Pairs with
    test_recipes_torch.py::test_label_smoothing_is_the_smoothed_cross_entropy,
    test_recipes_tf2.py::test_three_steps_with_a_recipe_give_the_torch_twins_weights,
    test_recipes_tf1.py::test_steps_match_torch."""
    logits, labels = RNG.normal(size=(16, 10)).astype(np.float32) * 3, RNG.integers(0, 10, 16)
    onehot = np.eye(10, dtype=np.float32)[labels]
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels),
                                                 label_smoothing=0.1).item()
    with pytest.raises(TypeError, match="label_smoothing"):
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    assert "label_smoothing" not in inspect.signature(tf1.losses.sparse_softmax_cross_entropy).parameters
    unsmoothed = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits))
    assert abs(unsmoothed - expected) > 0.03
    smoothed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    assert float(smoothed(onehot, logits)) == pytest.approx(expected, abs=1e-6)
    tf1_loss = tf1.losses.softmax_cross_entropy(onehot, logits, label_smoothing=0.1)
    assert float(tf1_loss) == pytest.approx(expected, abs=1e-6)


# -- mixed precision -----------------------------------------------------------------------------
def with_policy(policy, build):
    """build() under a Keras global dtype policy, set back to float32 after (tests share a process)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        return build()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_pitfall_mixed_precision_logits_stay_float32():
    """Library behaviour: under the ``mixed_bfloat16`` policy a ``Dense`` computes and
    returns bfloat16: logits up to 25 came out up to 0.13 off (0.07 with TF's oneDNN
    kernels, which the suite turns off); ``Dense(dtype="float32")`` keeps float32 and agrees
    to 1e-4. torch's ``autocast`` runs its ``Linear`` in bfloat16 too (0.075 off) and gives
    ``cross_entropy`` float32; it has no per-layer dtype: a layer kept float32 runs under
    ``autocast(enabled=False)``. Pairs with
    test_recipes_tf2.py::test_bf16_computes_like_torch_autocast_within_bf16_rounding,
    test_recipes_torch.py::test_bf16_steps_stay_near_float32."""
    x, w = RNG.normal(size=(32, 64)).astype(np.float32), RNG.normal(size=(64, 10)).astype(np.float32)
    expected = x @ w

    def logits(**kw):
        layer = keras.layers.Dense(10, use_bias=False, **kw)
        layer.build((None, 64))
        layer.set_weights([w])
        return layer(x)
    wrong, right = with_policy("mixed_bfloat16", lambda: (logits(), logits(dtype="float32")))
    assert (wrong.dtype, right.dtype) == (tf.bfloat16, tf.float32)
    assert np.abs(np.float32(wrong) - expected).max() > 0.01
    np.testing.assert_allclose(right.numpy(), expected, atol=1e-4)
    linear = torch.nn.Linear(64, 10, bias=False)
    linear.weight.data = torch.tensor(w.T.copy())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = linear(torch.tensor(x))
        with torch.autocast("cpu", enabled=False):
            kept = linear(torch.tensor(x).float())
    assert autocast.dtype == torch.bfloat16 and kept.dtype == torch.float32
    assert np.abs(autocast.float().numpy() - expected).max() > 0.01
    np.testing.assert_allclose(kept.numpy(), expected, atol=1e-4)


def test_pitfall_fp16_custom_loop_must_scale_the_loss():
    """Library behaviour: a float16 gradient below 3e-8 is zero. A loss of 1e-9 * sum of a
    float16 Dense's outputs gives the kernel no gradient at all unless the loss is scaled:
    Keras's ``compile`` wraps the optimizer in a ``LossScaleOptimizer`` for ``fit``, but a
    ``GradientTape`` loop must call ``optimizer.scale_loss`` on one (a plain optimizer's
    returns the loss as it is); torch needs a ``GradScaler``. Scaled, both give 4.0e-9, the
    float32 gradient to 1e-3 relative. Runs on a CPU: both libraries have fp16 kernels
    there. Pairs with test_recipes_torch.py::test_fp16_with_loss_scaling_on_a_gpu,
    test_recipes_tf2.py::test_the_fp16_optimizer_scales_the_loss_and_its_checkpoint_keeps_the_scale,
    test_recipes_tf1.py::test_fp16_scales_the_loss_and_keeps_float32_variables."""
    x = np.ones((4, 3), np.float32)

    def keras_grads(optimizer, model):
        with tf.GradientTape() as tape:
            scaled = optimizer.scale_loss(1e-9 * tf.reduce_sum(tf.cast(model(x), "float32")))
        grads = tape.gradient(scaled, model.trainable_variables)[0].numpy().ravel()
        scale = float(optimizer.scale_loss(tf.constant(1.0)))
        return grads / scale

    def keras_case():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
        plain, scaled = keras_grads(keras.optimizers.Adam(), model), keras_grads(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), model)
        model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
        return plain, scaled, type(model.optimizer).__name__
    plain, scaled, compiled = with_policy("mixed_float16", keras_case)
    assert compiled == "LossScaleOptimizer"
    assert not plain.any()
    np.testing.assert_allclose(scaled, 4e-9, rtol=1e-3)

    linear = torch.nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)

    def torch_grads(scaler=None):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = 1e-9 * linear(torch.tensor(x)).float().sum()
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        return linear.weight.grad.numpy().ravel()
    assert not torch_grads().any()
    np.testing.assert_allclose(torch_grads(torch.amp.GradScaler("cpu")), 4e-9, rtol=1e-3)
