"""Train the CNN image classifier with Keras's ``model.fit``: ``python -m tf2_impl.run_cnn_keras``.

Twins: ``torch_impl/run_cnn.py`` and ``tf1_compat/run_cnn.py`` (same flags, outputs and
section order); the GradientTape sibling is ``tf2_impl/run_cnn.py``. The model is built
with the Functional API (``keras.Input`` and layers called on tensors); ``--api`` picks
another of ``models.APIS``, ``--loop tape`` runs ``run_cnn`` instead. Where torch writes
the epoch loop out, Keras runs it inside ``fit``: the per-epoch bookkeeping enters as a
callback (``train.TrainingRunCallback``). Datasets: digits (bundled, default), synthetic,
cifar10 (``--download``). ``--fast`` uses ``tf2_impl/fast.py``. ``--replicas N`` trains
data-parallel (``tf2_impl/distributed.py``; ``--sync-bn``: batch norm over all replicas' rows).
"""
import math

import keras

from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.distributed import check_split
from common.recipes import check_precision, may_flip
from common.runner import TrainingRun, run_main
from common.seed import seed_everything
from common.weights import load_weights
from tf2_impl import fast
from tf2_impl.distributed import fit_feed, fit_loss, make_strategy, reseed_dropout
from tf2_impl.models import build_cnn, export_weights, import_weights
from tf2_impl.recipes import fit_callbacks, learning_rate, precision_policy
from tf2_impl.train import (TrainingRunCallback, add_keras_arguments, evaluate, load_checkpoint,
                            make_batches, make_deterministic, make_fit_batches, make_loss,
                            make_metric, make_optimizer, resolve_device, save_checkpoint)

MODULE = "tf2_impl.run_cnn_keras"
IMPLEMENTATION = "tf2"


def main(argv=None):
    parser = build_parser(MODULE, "image", "Train the CNN classifier with Keras (model.fit).",
                          replicas=True)
    add_keras_arguments(parser, api="functional", loop="fit", other="run_cnn")
    args = parse_args(parser, argv)
    if args.loop == "tape":
        from tf2_impl import run_cnn
        return run_cnn.main(argv)
    device = resolve_device(args.device)  # before any TensorFlow op
    strategy, world = make_strategy(args, device)  # the replicas' devices: before any op too
    check_precision(args.mixed_precision, device)
    seed_everything(args.seed)  # also keras.utils.set_random_seed: initial weights, dropout
    if args.deterministic:
        make_deterministic()

    # Data: NHWC numpy arrays, as fit takes them (torch permutes them to NCHW tensors).
    dataset = load_dataset(args.dataset, "image", args.data_dir, args.seed, args.download)
    x_train, x_val, x_test = dataset.x_train, dataset.x_val, dataset.x_test
    y_train, y_val, y_test = dataset.y_train, dataset.y_val, dataset.y_test  # int64 classes
    check_split(len(x_train), args.batch_size, world.size)  # every replica gets rows
    fit_batches = fast.make_fit_batches if args.fast else make_fit_batches

    # Model, loss and optimizer: compile names them, fit builds the training step from them.
    # Variables made in the scope have a copy on every replica; fit runs the step on each.
    build = fast.build_cnn if args.fast else build_cnn
    with strategy.scope():
        with precision_policy(args.mixed_precision):  # the layers take Keras's dtype policy
            model = build(dataset.input_shape, dataset.num_classes, args.api, args.sync_bn)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape,
                                      dataset.num_classes)
            import_weights(model, tensors)
        loss_fn = make_loss(dataset.task, args.label_smoothing)
        steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
        optimizer = make_optimizer(model, learning_rate(args, steps_per_epoch), args.weight_decay,
                                   args.clip_grad_norm, loss_scale=args.mixed_precision == "fp16")
        # jit_compile spelled out: Keras's "auto" turns XLA on whenever a GPU is visible.
        # fit_loss: on N replicas, the loss over the step's global row count (a workaround).
        model.compile(optimizer=optimizer, loss=fit_loss(loss_fn, strategy),
                      metrics=[make_metric(dataset.task)], jit_compile=False)
    run = TrainingRun(args, IMPLEMENTATION, dataset, device,
                      save=lambda path: save_checkpoint(path, model, optimizer),
                      load=lambda path: load_checkpoint(path, model, optimizer),
                      reseed=lambda seed: reseed_dropout(strategy, world, model, seed),
                      details={"api": args.api, "loop": args.loop},
                      lr=lambda: optimizer.learning_rate,  # a schedule's value at this step
                      world=world)  # only the chief writes
    run.log.info(f"model {model.name} ({args.api} API, {model.count_params()} parameters)")

    # Training: fit runs the epochs still to train over the shared batches (the feed holds
    # their order: shuffle=False); the callback calls run.start_epoch and run.end_epoch
    # where run_cnn's loop does. Keras's progress bar comes first, so the run's summary
    # line follows its last line.
    train_batches = fit_batches(x_train, y_train, args.batch_size, args.seed, run.initial_epoch,
                                args.augment, may_flip(dataset))
    train_batches = fit_feed(model, strategy, train_batches)  # N replicas: rows r::N each
    model.fit(train_batches, epochs=run.final_epoch, initial_epoch=run.initial_epoch,
              steps_per_epoch=steps_per_epoch, shuffle=False,
              validation_data=(x_val, y_val), validation_batch_size=args.batch_size,
              callbacks=[keras.callbacks.ProgbarLogger(), TrainingRunCallback(run),
                         *fit_callbacks(args, run)])
    run.load_best()

    # Test
    test, logits = evaluate(model, make_batches(x_test, y_test, args.batch_size), loss_fn,
                            dataset.task)
    run.finish(test, logits, export_weights(model))


if __name__ == "__main__":
    run_main(main)
