"""Train the recurrent classifier with a tf.GradientTape loop: ``python -m tf2_impl.run_rnn``.

Twins: ``torch_impl/run_rnn.py`` and ``tf1_compat/run_rnn.py`` (same flags, outputs and
section order); the ``model.fit`` sibling is ``tf2_impl/run_rnn_keras.py``, the image
sibling ``tf2_impl/run_cnn.py``. Each image is read as a sequence, one row per time step
(digits: 8 steps of 8 features, bundled, default; synthetic and cifar10: 32 steps of 96).
``--cell lstm|gru`` picks the recurrent layer, ``--bidirectional`` reads both ways. The
model is ``rnn_models.RNNClassifier`` (Subclassing, the Keras API closest to a torch
``nn.Module``); ``--api`` picks another of ``models.APIS``, ``--loop fit`` runs
``run_rnn_keras`` instead. Keeps the epoch with the best validation loss and evaluates the
test split with it. ``--fast`` uses ``tf2_impl/fast.py``'s feed, epoch and evaluation:
4.5-5x per digits epoch on the project's 2 shared CPU cores, the same numbers. Keras's
``unroll=True`` made the epoch 1.3x faster again on the CPU but takes Keras off the cuDNN
kernel on a GPU, so it is left out. ``--replicas N`` trains data-parallel
(``tf2_impl/distributed.py``), as do the workers of ``common.launch``.
"""
import math

from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.distributed import check_split
from common.recipes import check_precision
from common.runner import TrainingRun, run_main
from common.seed import seed_everything
from common.weights import load_weights, model_options
from tf2_impl import fast
from tf2_impl.distributed import make_strategy, make_train_step, until_stopped
from tf2_impl.rnn_models import build_rnn, export_weights, import_weights
from tf2_impl.recipes import apply_plateau, learning_rate, precision_policy
from tf2_impl.train import (add_keras_arguments, evaluate, load_checkpoint, make_batches,
                            make_deterministic, make_loss, make_optimizer, resolve_device,
                            save_checkpoint, train_one_epoch)

MODULE = "tf2_impl.run_rnn"
IMPLEMENTATION = "tf2"


def main(argv=None):
    parser = build_parser(MODULE, "sequence",
                          "Train the LSTM/GRU classifier with a TF2 GradientTape loop.",
                          replicas=True)
    add_keras_arguments(parser, api="subclassing", loop="tape", other="run_rnn_keras")
    args = parse_args(parser, argv)
    if args.loop == "fit":
        from tf2_impl import run_rnn_keras
        return run_rnn_keras.main(argv)
    device = resolve_device(args.device)  # before any TensorFlow op
    strategy, world = make_strategy(args, device)  # the replicas' devices: before any op too
    check_precision(args.mixed_precision, device)
    seed_everything(args.seed)  # also keras.utils.set_random_seed: the initial weights
    if args.deterministic:
        make_deterministic()

    # Data: (N, T, F) sequences, batch first, the one layout Keras's recurrent layers read
    # (torch's needs batch_first=True). TensorFlow copies each batch to the GPU itself.
    dataset = load_dataset(args.dataset, "sequence", args.data_dir, args.seed, args.download)
    x_train, x_val, x_test = dataset.x_train, dataset.x_val, dataset.x_test
    y_train, y_val, y_test = dataset.y_train, dataset.y_val, dataset.y_test  # int64 classes
    check_split(len(x_train), args.batch_size, world.size)  # every replica gets rows
    # --fast: tf2_impl/fast.py's versions of the feed, epoch and evaluation (same results).
    batches = fast.make_batches if args.fast else make_batches
    train_epoch = fast.train_one_epoch if args.fast else train_one_epoch
    evaluate_split = fast.evaluate if args.fast else evaluate

    # Model, loss and optimizer: variables made in the scope have a copy on every replica.
    num_features = dataset.input_shape[-1]
    with strategy.scope():
        with precision_policy(args.mixed_precision):  # the layers take Keras's dtype policy
            model = build_rnn(num_features, dataset.num_classes, args.cell, args.bidirectional,
                              args.api)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape,
                                      dataset.num_classes, **model_options(args))
            import_weights(model, tensors)
        loss_fn = make_loss(dataset.task, args.label_smoothing)
        steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
        optimizer = make_optimizer(model, learning_rate(args, steps_per_epoch), args.weight_decay,
                                   args.clip_grad_norm, loss_scale=args.mixed_precision == "fp16")
    # A graph (torch's step is eager); on N replicas, strategy.run on each one's rows.
    train_step = make_train_step(strategy, model, loss_fn, optimizer)
    run = TrainingRun(args, IMPLEMENTATION, dataset, device,
                      save=lambda path: save_checkpoint(path, model, optimizer),
                      load=lambda path: load_checkpoint(path, model, optimizer),
                      details={**model_options(args), "api": args.api, "loop": args.loop},
                      lr=lambda: optimizer.learning_rate,  # a schedule's value at this step
                      world=world)  # only the chief writes
    apply_plateau(optimizer, args, run.val_losses())  # --resume: the rate of the history
    run.log.info(f"model {model.name} ({args.api} API, {model.count_params()} parameters)")

    # Training
    val_batches = batches(x_val, y_val, args.batch_size)
    for epoch in run.epochs():
        train_batches = batches(x_train, y_train, args.batch_size, args.seed, epoch)
        train_batches = until_stopped(run, strategy, world, train_batches)  # multi-worker
        train = train_epoch(train_step, train_batches, dataset.task)
        val, _ = evaluate_split(model, val_batches, loss_fn, dataset.task)
        run.end_epoch(epoch, train, val)
        apply_plateau(optimizer, args, run.val_losses())
    run.load_best()

    # Test
    test_batches = batches(x_test, y_test, args.batch_size)
    test, logits = evaluate_split(model, test_batches, loss_fn, dataset.task)
    run.finish(test, logits, export_weights(model))


if __name__ == "__main__":
    run_main(main)
