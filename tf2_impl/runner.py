"""The ``main`` of the four TF2 entry points: ``run_nn``, ``run_nn_keras``, ``run_cnn``,
``run_cnn_keras``.

Twins: ``torch_impl/run_cnn.py`` and ``torch_impl/run_nn.py`` (same flags, outputs and
section order; ``main`` below reads top to bottom like theirs). The four entry points
differ only in their task and in the defaults of the two TF-only flags, which choose
among the ways Keras offers to build and to train the same model:

* ``--api sequential|functional|subclassing`` (``models.build_mlp`` / ``build_cnn``);
* ``--loop fit|tape``: ``model.compile`` + ``model.fit`` with callbacks, or a custom
  ``tf.GradientTape`` loop (``train.make_train_step``).

Every combination trains on the same batches (``common.datasets.batch_indices``) with
the same dropout seeds per epoch, keeps the epoch with the best validation loss, and
evaluates the test split with it. ``--jit-compile`` compiles the steps with XLA (off by
default: its fused kernels change the last bits of the numbers).
"""
import math
import time

import keras

from common.cli import build_parser, parse_args
from common.datasets import batch_indices, load_dataset
from common.runner import TrainingRun
from common.seed import epoch_seed, seed_everything
from common.weights import load_weights
from tf2_impl.models import APIS, build_cnn, build_mlp, export_weights, import_weights
from tf2_impl.train import (TrainingRunCallback, as_tensor, compile_model, device_scope,
                            evaluate, evaluate_compiled, fit_batches, load_checkpoint,
                            make_deterministic, make_optimizer, make_predict_step,
                            make_train_step, reseed_dropout, resolve_device, save_checkpoint,
                            train_one_epoch)

IMPLEMENTATION = "tf2"
LOOPS = ("fit", "tape")


def main(argv, *, module, kind, description, api, loop):
    """Parse `argv` for entry point `module` (`kind` "image" or "tabular") and run it;
    `api` and `loop` are that entry point's defaults for --api and --loop."""
    parser = build_parser(module, kind, description)
    parser.add_argument("--api", choices=APIS, default=api,
                        help=f"Keras model-building API (default {api})")
    parser.add_argument("--loop", choices=LOOPS, default=loop,
                        help=f"fit: model.fit with callbacks; tape: a custom tf.GradientTape "
                             f"loop (default {loop})")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile the training and inference steps with XLA")
    args = parse_args(parser, argv)
    device = resolve_device(args.device)  # before any TensorFlow op
    seed_everything(args.seed)  # also keras.utils.set_random_seed: initial weights, dropout
    if args.deterministic:
        make_deterministic()
    with device_scope(device):
        train_and_test(args, kind, device)


def train_and_test(args, kind, device):
    """Everything after the process set-up: data, model, training, the test split."""
    dataset = load_dataset(args.dataset, kind, args.data_dir, args.seed, args.download)
    run = TrainingRun(args, IMPLEMENTATION, dataset, device)
    task = dataset.task
    # Images stay NHWC, the layout of Keras's Conv2D (torch converts them to NCHW).
    x_train, x_val, x_test = dataset.x_train, dataset.x_val, dataset.x_test
    y_train, y_val, y_test = dataset.y_train, dataset.y_val, dataset.y_test
    if task == "regression":
        # Targets (N,) -> (N, 1), the shape of the model's output (see train.make_loss).
        y_train, y_val, y_test = (y.reshape(-1, 1) for y in (y_train, y_val, y_test))

    if task == "classification":
        model = build_cnn(args.api, dataset.input_shape, dataset.num_classes)
    else:
        model = build_mlp(args.api, dataset.input_shape[-1])
    run.log.info(f"model {model.name} ({args.api} API, {model.count_params()} parameters), "
                 f"{args.loop} loop" + (", XLA" if args.jit_compile else ""))
    if args.weights:
        tensors, _ = load_weights(args.weights, task, dataset.input_shape, dataset.num_classes)
        import_weights(model, tensors)
    optimizer = make_optimizer(args.lr)
    # Adam's moment variables are created lazily; build them now so that a checkpoint
    # can restore into them.
    optimizer.build(model.trainable_variables)
    if run.last_checkpoint:  # --resume after a saved epoch
        load_checkpoint(run.checkpoint_file(run.last_checkpoint), model, optimizer)

    def end_epoch(epoch, train, val, seconds):
        """Record the epoch, then checkpoint it: last (model + optimizer), best weights."""
        is_best = run.end_epoch(epoch, train, val, seconds)
        last = save_checkpoint(run.checkpoint_path("last", epoch), model, optimizer)
        best = save_checkpoint(run.checkpoint_path("best", epoch, ".weights.h5"), model) \
            if is_best else None
        run.save_state(last, best)

    if args.loop == "fit":
        compile_model(model, optimizer, task, args.jit_compile)
        if not args.eval_only:
            epochs = run.epochs()
            if epochs:
                # One fit call for all epochs, reading the shared batches from one pipeline
                # (shuffle=False: the pipeline's order is the shuffle). Keras's progress
                # bar comes first so that the summary line follows its last line.
                model.fit(fit_batches(x_train, y_train, args.batch_size, args.seed, epochs),
                          epochs=epochs.stop - 1, initial_epoch=epochs.start - 1,
                          steps_per_epoch=math.ceil(len(x_train) / args.batch_size),
                          shuffle=False, validation_data=(x_val, y_val),
                          validation_batch_size=args.batch_size,
                          callbacks=[keras.callbacks.ProgbarLogger(),
                                     TrainingRunCallback(run, args.seed, end_epoch)])
            load_checkpoint(run.checkpoint_file(run.best_checkpoint), model)
        test, outputs = evaluate_compiled(model, x_test, y_test, task, args.batch_size)
    else:
        train_step, metrics = make_train_step(model, optimizer, task, dataset.input_shape,
                                              args.jit_compile)
        predict_step = make_predict_step(model, dataset.input_shape, args.jit_compile)
        # Each split becomes one tensor on the device once; batches are gathered from it.
        x_train, y_train = as_tensor(x_train), as_tensor(y_train)
        x_val, x_test = as_tensor(x_val), as_tensor(x_test)
        if not args.eval_only:
            for epoch in run.epochs():
                reseed_dropout(model, epoch_seed(args.seed, epoch))  # as after --resume
                batches = batch_indices(len(dataset.x_train), args.batch_size, args.seed, epoch)
                start = time.perf_counter()
                train = train_one_epoch(train_step, metrics, x_train, y_train, batches,
                                        after_batch=lambda: run.check_stop(epoch),
                                        desc=f"epoch {epoch}/{args.epochs}")
                seconds = time.perf_counter() - start
                val, _ = evaluate(predict_step, x_val, y_val, task, args.batch_size)
                end_epoch(epoch, train, val, seconds)
            load_checkpoint(run.checkpoint_file(run.best_checkpoint), model)
        test, outputs = evaluate(predict_step, x_test, y_test, task, args.batch_size)

    run.finish(test, outputs, export_weights(model), extra={"api": args.api, "loop": args.loop})
