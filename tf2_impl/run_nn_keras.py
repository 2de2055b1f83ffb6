"""Train the MLP regressor with Keras's ``model.fit``: ``python -m tf2_impl.run_nn_keras``.

Twins: ``torch_impl/run_nn.py`` and ``tf1_compat/run_nn.py`` (same flags, outputs and
section order); the GradientTape sibling is ``tf2_impl/run_nn.py``, the CNN sibling
``tf2_impl/run_cnn_keras.py``. The model is a ``keras.Sequential`` list of layers;
``--api`` picks another of ``models.APIS``, ``--loop tape`` runs ``run_nn`` instead.
Keras runs the epoch loop inside ``fit``; the per-epoch bookkeeping enters as a callback
(``train.TrainingRunCallback``). Datasets: friedman (generated, default), diabetes
(bundled), california (``--download``). ``--fast`` feeds fit from ``tf2_impl/fast.py``.
``--replicas N`` trains data-parallel (``tf2_impl/distributed.py``); multi-worker fit is refused.
"""
import math

import keras

from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.distributed import check_split
from common.recipes import check_precision
from common.runner import TrainingRun, run_main
from common.seed import seed_everything
from common.weights import load_weights
from tf2_impl import fast
from tf2_impl.distributed import fit_feed, fit_loss, make_strategy
from tf2_impl.models import build_mlp, export_weights, import_weights
from tf2_impl.recipes import fit_callbacks, learning_rate, precision_policy
from tf2_impl.train import (TrainingRunCallback, add_keras_arguments, evaluate, load_checkpoint,
                            make_batches, make_deterministic, make_fit_batches, make_loss,
                            make_metric, make_optimizer, resolve_device, save_checkpoint)

MODULE = "tf2_impl.run_nn_keras"
IMPLEMENTATION = "tf2"


def main(argv=None):
    parser = build_parser(MODULE, "tabular", "Train the MLP regressor with Keras (model.fit).",
                          replicas=True)
    add_keras_arguments(parser, api="sequential", loop="fit", other="run_nn")
    args = parse_args(parser, argv)
    if args.loop == "tape":
        from tf2_impl import run_nn
        return run_nn.main(argv)
    device = resolve_device(args.device)  # before any TensorFlow op
    strategy, world = make_strategy(args, device)  # the replicas' devices: before any op too
    check_precision(args.mixed_precision, device)
    seed_everything(args.seed)  # also keras.utils.set_random_seed: the initial weights
    if args.deterministic:
        make_deterministic()

    # Data: numpy arrays, as fit takes them.
    dataset = load_dataset(args.dataset, "tabular", args.data_dir, args.seed, args.download)
    x_train, x_val, x_test = dataset.x_train, dataset.x_val, dataset.x_test
    # Targets (N,) -> (N, 1), the shape of the model's output (see train.make_loss).
    y_train, y_val, y_test = (y.reshape(-1, 1)
                              for y in (dataset.y_train, dataset.y_val, dataset.y_test))
    check_split(len(x_train), args.batch_size, world.size)  # every replica gets rows
    fit_batches = fast.make_fit_batches if args.fast else make_fit_batches

    # Model, loss and optimizer: compile names them, fit builds the training step from them.
    # Variables made in the scope have a copy on every replica; fit runs the step on each.
    with strategy.scope():
        with precision_policy(args.mixed_precision):  # the layers take Keras's dtype policy
            model = build_mlp(dataset.input_shape[-1], args.api)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape)
            import_weights(model, tensors)
        loss_fn = make_loss(dataset.task, args.label_smoothing)
        steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
        optimizer = make_optimizer(model, learning_rate(args, steps_per_epoch), args.weight_decay,
                                   args.clip_grad_norm, loss_scale=args.mixed_precision == "fp16")
        # jit_compile spelled out: Keras's "auto" turns XLA on whenever a GPU is visible.
        # fit_loss: on N replicas, the loss over the step's global row count (a workaround).
        model.compile(optimizer=optimizer, loss=fit_loss(loss_fn, strategy),
                      metrics=[make_metric(dataset.task)], jit_compile=False)
    # No reseed: without dropout nothing in an epoch is random but the batch order.
    run = TrainingRun(args, IMPLEMENTATION, dataset, device,
                      save=lambda path: save_checkpoint(path, model, optimizer),
                      load=lambda path: load_checkpoint(path, model, optimizer),
                      details={"api": args.api, "loop": args.loop},
                      lr=lambda: optimizer.learning_rate,  # a schedule's value at this step
                      world=world)  # only the chief writes
    run.log.info(f"model {model.name} ({args.api} API, {model.count_params()} parameters)")

    # Training: fit runs the epochs still to train; the feed holds the shared batch order.
    train_batches = fit_batches(x_train, y_train, args.batch_size, args.seed, run.initial_epoch)
    train_batches = fit_feed(model, strategy, train_batches)  # N replicas: rows r::N each
    model.fit(train_batches, epochs=run.final_epoch, initial_epoch=run.initial_epoch,
              steps_per_epoch=steps_per_epoch, shuffle=False,
              validation_data=(x_val, y_val), validation_batch_size=args.batch_size,
              callbacks=[keras.callbacks.ProgbarLogger(), TrainingRunCallback(run),
                         *fit_callbacks(args, run)])
    run.load_best()

    # Test
    test, predictions = evaluate(model, make_batches(x_test, y_test, args.batch_size), loss_fn,
                                 dataset.task)
    run.finish(test, predictions, export_weights(model))


if __name__ == "__main__":
    run_main(main)
