"""Training-recipe pitfalls between torch, Keras 3 and TF1, one named test each: the
optimizer, the schedules and early stopping here; augmentation, label smoothing and mixed
precision in test_recipes_batch_pitfalls.py.

Every test here documents library behaviour, not this project's code: the wrong way (a
library default, or the obvious port) gives different numbers, the right way agrees with
torch and with the rule of ``common/recipes.py``. Each docstring names the project test
that holds the shipped implementations to the right way. Figures are from torch 2.15,
Keras 3.15.1 and TensorFlow 2.21 on a CPU; docs/PORTING.md, "Training recipes", explains
each one.
"""
import inspect

import numpy as np
import torch
import tensorflow as tf
import keras

from common.recipes import early_stop_due, epoch_lr, plateau_lr, recorded_lr

tf1 = tf.compat.v1


def torch_plateau_lrs(val_losses, **kw):
    """The rate after each epoch's ``ReduceLROnPlateau.step(val_loss)``, from lr 1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, **kw)
    lrs = []
    for loss in val_losses:
        scheduler.step(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def keras_plateau_lrs(val_losses, **kw):
    """The rate after each epoch end of Keras's ``ReduceLROnPlateau``, from lr 1."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    callback = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, **kw)
    callback.set_model(model)
    callback.on_train_begin()
    lrs = []
    for epoch, loss in enumerate(val_losses):
        callback.on_epoch_end(epoch, {"val_loss": loss})
        lrs.append(float(model.optimizer.learning_rate.numpy()))
    return lrs


def reference_lrs(val_losses, patience):
    return [plateau_lr(1.0, val_losses[:i + 1], patience, 0.5, 1e-4) for i in range(len(val_losses))]


def one_step(make_optimizer, w0, grad, torch_side):
    """The weights after one optimizer step from `w0` with gradient `grad`."""
    if torch_side:
        p = torch.nn.Parameter(torch.tensor(w0))
        optimizer = make_optimizer([p])
        p.grad = torch.tensor(grad)
        optimizer.step()
        return p.detach().numpy()
    v = keras.Variable(w0)
    make_optimizer().apply_gradients([(tf.constant(grad), v)])
    return v.numpy()


# -- gradient clipping ---------------------------------------------------------------------------
def test_pitfall_keras_clipnorm_clips_each_variable():
    """Library behaviour: Keras ``clipnorm=1`` clips each gradient to norm 1 on its own,
    giving [0.6, 0.8], [1.0] for gradients [3, 4], [12]; torch's ``clip_grad_norm_`` scales
    all by one factor (global norm 13): [0.231, 0.308], [0.923]. ``global_clipnorm`` and
    TF1's ``clip_by_global_norm`` agree; TF1's ``clip_by_norm`` per tensor is the wrong way.
    Pairs with test_recipes_torch.py::test_clip_grad_norm_clips_the_global_norm,
    test_recipes_tf2.py::test_three_steps_with_a_recipe_give_the_torch_twins_weights,
    test_recipes_tf1.py::test_steps_match_torch."""
    grads = [np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)]
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    expected = np.concatenate([p.grad.numpy() for p in params])

    def keras_clipped(**clip):  # SGD with lr 1 from zero: the weights are minus the step
        variables = [keras.Variable(np.zeros_like(g)) for g in grads]
        keras.optimizers.SGD(1.0, **clip).apply_gradients(zip(map(tf.constant, grads), variables))
        return -np.concatenate([v.numpy() for v in variables])
    assert np.abs(keras_clipped(clipnorm=1.0) - expected).max() > 0.3
    np.testing.assert_allclose(keras_clipped(global_clipnorm=1.0), expected, atol=1e-6)
    tf1_global = np.concatenate([g.numpy() for g in tf.clip_by_global_norm(grads, 1.0)[0]])
    tf1_each = np.concatenate([tf.clip_by_norm(g, 1.0).numpy() for g in grads])
    np.testing.assert_allclose(tf1_global, expected, atol=1e-6)
    assert np.abs(tf1_each - expected).max() > 0.3


# -- weight decay --------------------------------------------------------------------------------
W0, GRAD = np.array([1.0, -2.0, 0.5], np.float32), np.array([0.1, 0.2, -0.3], np.float32)


def test_pitfall_adam_weight_decay_is_l2_in_torch_decoupled_in_keras():
    """Library behaviour: torch ``Adam(weight_decay=0.1)`` adds 0.1*w to the gradient (L2),
    Keras ``Adam(weight_decay=0.1)`` subtracts lr*0.1*w from the weights (decoupled): one
    step of lr 0.1 ends 0.08 apart. torch ``AdamW`` and Keras ``AdamW`` agree (1e-6: Adam's
    eps). Pairs with test_recipes_torch.py::test_weight_decay_is_decoupled,
    test_recipes_tf2.py::test_three_steps_with_a_recipe_give_the_torch_twins_weights,
    test_recipes_tf1.py::test_steps_match_torch."""
    def torch_step(cls):
        return one_step(lambda ps: cls(ps, lr=0.1, weight_decay=0.1), W0, GRAD, True)

    def keras_step(cls):
        return one_step(lambda: cls(0.1, weight_decay=0.1, epsilon=1e-8), W0, GRAD, False)
    assert np.abs(torch_step(torch.optim.Adam) - keras_step(keras.optimizers.Adam)).max() > 0.05
    np.testing.assert_allclose(torch_step(torch.optim.AdamW), keras_step(keras.optimizers.AdamW),
                               atol=2e-6)


def test_pitfall_adamw_default_weight_decay_differs():
    """Library behaviour: ``AdamW``'s default weight decay is 0.01 in torch and 0.004 in
    Keras, so two default AdamWs differ after one step (1.2e-3 at lr 0.1 on weights of size
    2). This project passes ``--weight-decay`` to both and has no default of its own. Pairs
    with test_recipes_torch.py::test_weight_decay_is_decoupled,
    test_recipes_tf2.py::test_three_steps_with_a_recipe_give_the_torch_twins_weights."""
    torch_default = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults["weight_decay"]
    assert (torch_default, keras.optimizers.AdamW().weight_decay) == (0.01, 0.004)
    wrong = [one_step(lambda ps: torch.optim.AdamW(ps, lr=0.1), W0, GRAD, True),
             one_step(lambda: keras.optimizers.AdamW(0.1, epsilon=1e-8), W0, GRAD, False)]
    right = [one_step(lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01), W0, GRAD, True),
             one_step(lambda: keras.optimizers.AdamW(0.1, weight_decay=0.01, epsilon=1e-8),
                      W0, GRAD, False)]
    assert np.abs(wrong[0] - wrong[1]).max() > 1e-3
    np.testing.assert_allclose(right[0], right[1], atol=2e-6)


# -- ReduceLROnPlateau ---------------------------------------------------------------------------
def test_pitfall_plateau_threshold_relative_vs_absolute():
    """Library behaviour: a validation loss of 10 falling 3e-4 per epoch, patience 2 (torch
    ``patience=1``: test_pitfall_plateau_patience_off_by_one). torch's default
    ``threshold=1e-4`` is relative (an improvement must beat best*(1 - 1e-4), by 1e-3 here):
    it halves the rate after epoch 3 and again after epoch 6. Keras's ``min_delta=1e-4`` is
    absolute: it never cuts. ``threshold_mode="abs"`` makes torch agree with Keras and the
    rule. Pairs with test_recipes_torch.py::test_plateau_values_tell_the_rules_apart,
    test_recipes_torch.py::test_lr_of_every_epoch_is_the_shared_rule,
    test_recipes_common.py::test_plateau_rule_is_torch_abs_with_patience_minus_one_and_keras."""
    losses = [10 - 3e-4 * i for i in range(8)]
    keras_lrs = keras_plateau_lrs(losses, patience=2, min_delta=1e-4)
    assert keras_lrs == reference_lrs(losses, 2) == [1.0] * 8
    assert torch_plateau_lrs(losses, patience=1) == [1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert torch_plateau_lrs(losses, patience=1, threshold=1e-4, threshold_mode="abs") == keras_lrs


def test_pitfall_plateau_patience_off_by_one():
    """Library behaviour: after the best epoch, torch's ``ReduceLROnPlateau(patience=2)``
    cuts the rate once it has seen 3 epochs without improvement (``num_bad_epochs >
    patience``), Keras's ``ReduceLROnPlateau(patience=2)`` after 2 (``wait >= patience``).
    The manual's "5 epochs" is torch ``patience=4``, Keras ``patience=5``. Pairs with
    test_recipes_torch.py::test_plateau_values_tell_the_rules_apart,
    test_recipes_tf2.py::test_each_loop_records_the_reference_rate_of_every_epoch,
    test_recipes_common.py::test_plateau_rule_is_torch_abs_with_patience_minus_one_and_keras."""
    losses = [1.0] + [2.0] * 7
    keras_lrs = keras_plateau_lrs(losses, patience=2, min_delta=1e-4)
    assert keras_lrs == reference_lrs(losses, 2) == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    wrong = torch_plateau_lrs(losses, patience=2, threshold_mode="abs")
    assert wrong == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert torch_plateau_lrs(losses, patience=2 - 1, threshold_mode="abs") == keras_lrs



def test_pitfall_keras_monitor_compares_in_float32():
    """Library behaviour: Keras's callbacks test ``current - min_delta < best`` with
    ``keras.ops.less``, in float32; torch and ``plateau_lr`` compare Python floats. A loss
    1e-8 beyond the threshold (1 - 1e-4 - 1e-8 after 1) is an improvement for torch and the
    rule, none for Keras, which cuts one epoch early; 1e-7 beyond, all agree. Pairs with
    test_recipes_common.py::test_plateau_rule_is_torch_abs_with_patience_minus_one_and_keras,
    test_recipes_tf2.py::test_the_keras_schedules_give_torchs_rates_and_the_shared_rule."""
    def lrs(beyond):
        losses = [1.0, 1.0 - 1e-4 - beyond, 1.0 - 1e-4 - beyond]
        return (keras_plateau_lrs(losses, patience=1, min_delta=1e-4),
                torch_plateau_lrs(losses, patience=0, threshold=1e-4, threshold_mode="abs"),
                reference_lrs(losses, 1))
    keras_lrs, torch_lrs, reference = lrs(1e-8)
    assert torch_lrs == reference == [1.0, 1.0, 0.5] and keras_lrs == [1.0, 0.5, 0.25]
    keras_lrs, torch_lrs, reference = lrs(1e-7)
    assert keras_lrs == torch_lrs == reference

# -- schedules: what they count ------------------------------------------------------------------
def test_pitfall_keras_schedule_counts_optimizer_steps():
    """Library behaviour: torch's ``StepLR(step_size=2)`` counts ``scheduler.step()`` calls,
    one per epoch; Keras schedules are called with ``optimizer.iterations``. Ported as
    ``ExponentialDecay(decay_steps=2)`` with 5 steps per epoch, the rate of epoch 2 is
    already 2.5e-4 instead of 1e-3 (2.4e-7 by epoch 6); ``decay_steps=2 * steps_per_epoch``
    gives the rule's 1e-3, 1e-3, 5e-4, ... Pairs with
    test_recipes_tf2.py::test_the_keras_schedules_give_torchs_rates_and_the_shared_rule,
    test_recipes_tf2.py::test_each_loop_records_the_reference_rate_of_every_epoch."""
    steps_per_epoch, epochs = 5, 6
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    torch_lrs = []
    for _ in range(epochs):
        torch_lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps_per_epoch):
            p.grad = torch.ones(1)
            optimizer.step()
        scheduler.step()

    def keras_lrs(decay_steps):
        variable = keras.Variable(np.zeros(1, np.float32))
        schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps, 0.5, staircase=True)
        optimizer = keras.optimizers.SGD(schedule)
        lrs = []
        for _ in range(epochs):
            lrs.append(recorded_lr(optimizer.learning_rate.numpy()))
            for _ in range(steps_per_epoch):
                optimizer.apply_gradients([(tf.ones(1), variable)])
        return lrs
    args = type("Args", (), dict(lr_schedule="step", lr=1e-3, lr_gamma=0.5, lr_step=2))
    reference = [recorded_lr(epoch_lr(args, e, steps_per_epoch)) for e in range(1, epochs + 1)]
    assert [recorded_lr(lr) for lr in torch_lrs] == reference == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
    assert keras_lrs(2)[1] == 2.5e-4
    assert keras_lrs(2 * steps_per_epoch) == reference


def test_pitfall_tf1_decay_needs_global_step():
    """Library behaviour: TF1's ``exponential_decay(1.0, global_step, 1, 0.5,
    staircase=True)`` reads the global step, which only ``minimize(...,
    global_step=global_step)`` increments. Without it the rate is still 1.0 after 4 steps
    (the step counter at 0); with it 0.0625. Pairs with
    test_recipes_tf1.py::test_lr_of_every_epoch_is_the_shared_rule."""
    def rate_after_four_steps(pass_global_step):
        with tf.Graph().as_default():
            global_step = tf1.train.get_or_create_global_step()
            lr = tf1.train.exponential_decay(1.0, global_step, 1, 0.5, staircase=True)
            w = tf1.get_variable("w", initializer=tf.constant([1.0]))
            train = tf1.train.GradientDescentOptimizer(lr).minimize(
                tf.reduce_sum(w * w), global_step=global_step if pass_global_step else None)
            with tf1.Session() as session:
                session.run(tf1.global_variables_initializer())
                for _ in range(4):
                    session.run(train)
                return session.run([lr, global_step])
    assert rate_after_four_steps(False) == [1.0, 0]
    assert rate_after_four_steps(True) == [0.0625, 4]


# -- early stopping ------------------------------------------------------------------------------
def test_pitfall_keras_early_stopping_keeps_the_last_weights():
    """Library behaviour: Keras's ``EarlyStopping`` has ``restore_best_weights=False``:
    after stopping it leaves the last epoch's weights (epoch 4's here), not the best epoch's
    (2). torch has no early stopping at all. ``patience=2`` stops when ``early_stop_due``
    does (2 epochs without a lower validation loss); ``restore_best_weights=True`` restores
    epoch 2. Pairs with
    test_recipes_common.py::test_early_stop_ends_the_run_and_resume_keeps_the_count,
    test_recipes_tf2.py::test_early_stop_ends_both_loops_after_the_patience."""
    defaults = inspect.signature(keras.callbacks.EarlyStopping).parameters
    assert (defaults["restore_best_weights"].default, defaults["patience"].default) == (False, 0)
    losses = [1.0, 0.5, 0.7, 0.8, 0.9, 1.0]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    def final_kernel(**kw):
        callback = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, **kw)
        callback.set_model(model)
        model.stop_training = False
        callback.on_train_begin()
        for epoch, loss in enumerate(losses, start=1):
            model.layers[0].kernel.assign([[float(epoch)]])  # "training" marks the weights
            callback.on_epoch_end(epoch - 1, {"val_loss": loss})
            if model.stop_training:
                break
        callback.on_train_end()
        return epoch, float(model.layers[0].kernel.numpy()[0, 0])
    args = type("Args", (), dict(early_stop=2))
    stop = next(e for e in range(1, 7) if early_stop_due(args, e, 1 + int(np.argmin(losses[:e]))))
    assert final_kernel() == (stop, 4.0) and stop == 4
    assert final_kernel(restore_best_weights=True) == (4, 2.0)
