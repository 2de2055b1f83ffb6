"""The training recipes (``common/recipes.py`` states each rule) in Keras 3's idiom.

Twins: ``torch_impl/train.py`` (``lr_scheduler``, ``AdamW``, ``clip_grad_norm_``,
``autocast``) and ``tf1_compat/recipes.py``. What Keras does differently, and where it is:

* a learning-rate schedule is the optimizer's ``learning_rate`` itself
  (``learning_rate`` below), a function of the optimizer's step counter, which the
  checkpoint holds: --resume goes on along it. torch steps a separate scheduler object.
* ``--lr-schedule plateau``: ``model.fit`` uses Keras's ``ReduceLROnPlateau`` callback
  (``PlateauCallback`` below, which also picks up a resumed run's history); the
  GradientTape loop sets the rate that the shared rule gives at each epoch's end
  (``apply_plateau``).
* ``--weight-decay`` (``AdamW``) and ``--clip-grad-norm`` (``global_clipnorm``) are
  optimizer arguments: ``train.make_optimizer``. ``--early-stop``: ``common.runner``
  ends the tape loop's epochs, ``train.TrainingRunCallback`` sets ``model.stop_training``.
* ``--label-smoothing``: ``CategoricalCrossentropy`` on one-hot targets (``SmoothedCrossEntropy``).
* ``--augment``: ``common.recipes.augment_batch`` in the training feeds
  (``train.make_batches``, ``train.EpochBatches`` and ``fast.py``'s twins).
* ``--mixed-precision``: a dtype policy that the layers take when they are made
  (``precision_policy``); the output layers are float32 (``models.py``); fp16 scales
  the loss (``train.make_optimizer``, ``train.make_train_step``).
"""
import contextlib

import keras

from common import recipes

# --mixed-precision -> Keras's dtype policy: float32 variables, computations in bf16/fp16.
POLICIES = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def learning_rate(args, steps_per_epoch):
    """--lr-schedule as the optimizer's ``learning_rate``: a Keras schedule, or the rate.

    Keras's schedules count optimizer steps where torch's ``StepLR`` counts epochs: a
    step every ``lr_step`` epochs is ``decay_steps = lr_step * steps_per_epoch``, with
    ``staircase=True`` (without it the rate decays a little at every step)."""
    schedules = keras.optimizers.schedules
    if args.lr_schedule == "step":
        return schedules.ExponentialDecay(args.lr, decay_steps=args.lr_step * steps_per_epoch,
                                          decay_rate=args.lr_gamma, staircase=True)
    if args.lr_schedule == "cosine":
        return schedules.CosineDecay(args.lr, decay_steps=args.epochs * steps_per_epoch)
    return args.lr  # constant; plateau: changed at epoch ends, by PlateauCallback or apply_plateau


class PlateauCallback(keras.callbacks.ReduceLROnPlateau):
    """``model.fit``'s --lr-schedule plateau: Keras's callback with the shared rule, which
    is its own with ``patience=P`` (torch's needs P - 1) and ``min_delta`` (absolute, as
    torch's ``threshold`` is only with ``threshold_mode="abs"``).

    Keras's callback starts over at every ``fit`` (``on_train_begin`` forgets its wait
    count and best loss): on --resume this one replays the validation losses of the
    epochs already trained, from the initial rate, through Keras's own ``on_epoch_end``."""

    def __init__(self, args, val_losses):
        super().__init__(monitor="val_loss", mode="min", factor=args.plateau_factor,
                         patience=args.plateau_patience, min_delta=args.plateau_threshold)
        self.initial_lr, self.past_val_losses = args.lr, list(val_losses)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.model.optimizer.learning_rate = self.initial_lr
        for epoch, loss in enumerate(self.past_val_losses):
            self.on_epoch_end(epoch, {"val_loss": loss})


def fit_callbacks(args, run):
    """The recipe callbacks of ``model.fit`` (besides ``train.TrainingRunCallback``)."""
    return [PlateauCallback(args, run.val_losses())] if args.lr_schedule == "plateau" else []


def apply_plateau(optimizer, args, val_losses):
    """The GradientTape loop's --lr-schedule plateau: set the rate that the shared rule
    gives after `val_losses` (at each epoch's end, and from the history on --resume)."""
    if args.lr_schedule == "plateau":
        optimizer.learning_rate = recipes.plateau_lr(args.lr, val_losses, args.plateau_patience,
                                                     args.plateau_factor, args.plateau_threshold)


class SmoothedCrossEntropy(keras.losses.CategoricalCrossentropy):
    """Cross-entropy on logits with label smoothing, for int64 class targets.

    ``SparseCategoricalCrossentropy`` (the loss without smoothing) has no
    ``label_smoothing``; ``CategoricalCrossentropy`` has it but takes one-hot targets, so
    the integer targets are made one-hot here and the feeds, metrics and predictions keep
    the class indices of the other runs (torch's ``CrossEntropyLoss`` smooths integer
    targets itself). The validation and test losses are smoothed too (the same loss)."""

    def __init__(self, label_smoothing):
        super().__init__(from_logits=True, label_smoothing=label_smoothing)

    def call(self, y_true, y_pred):
        classes = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        return super().call(keras.ops.one_hot(classes, keras.ops.shape(y_pred)[-1]), y_pred)


@contextlib.contextmanager
def precision_policy(precision):
    """Keras's global dtype policy for --mixed-precision while the model is built.

    Each layer takes the global policy when it is made and keeps it; the policy is
    process-wide, so it is set back at once (a later model in this process, such as a
    test's, is float32 again)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
