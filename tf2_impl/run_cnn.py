"""Train the CNN image classifier with a tf.GradientTape loop: ``python -m tf2_impl.run_cnn``.

Twins: ``torch_impl/run_cnn.py`` and ``tf1_compat/run_cnn.py`` (same flags, outputs and
section order); the ``model.fit`` sibling is ``tf2_impl/run_cnn_keras.py``, the MLP
sibling ``tf2_impl/run_nn.py``. The model is ``models.CNNClassifier`` (Subclassing, the
Keras API closest to a torch ``nn.Module``); ``--api`` picks another of ``models.APIS``,
``--loop fit`` runs ``run_cnn_keras`` instead. Datasets: digits (bundled, default),
synthetic, cifar10 (``--download``). Keeps the epoch with the best validation loss and
evaluates the test split with it. ``--fast`` uses ``tf2_impl/fast.py``. ``--replicas N``
trains data-parallel (``tf2_impl/distributed.py``; ``--sync-bn``: batch norm over all
replicas' rows), as do the workers of ``common.launch``.
"""
import math

from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.distributed import check_split
from common.recipes import check_precision, may_flip
from common.runner import TrainingRun, run_main
from common.seed import seed_everything
from common.weights import load_weights
from tf2_impl import fast
from tf2_impl.distributed import make_strategy, make_train_step, reseed_dropout, until_stopped
from tf2_impl.models import build_cnn, export_weights, import_weights
from tf2_impl.recipes import apply_plateau, learning_rate, precision_policy
from tf2_impl.train import (add_keras_arguments, evaluate, load_checkpoint, make_batches,
                            make_deterministic, make_loss, make_optimizer, resolve_device,
                            save_checkpoint, train_one_epoch)

MODULE = "tf2_impl.run_cnn"
IMPLEMENTATION = "tf2"


def main(argv=None):
    parser = build_parser(MODULE, "image", "Train the CNN classifier with a TF2 GradientTape loop.",
                          replicas=True)
    add_keras_arguments(parser, api="subclassing", loop="tape", other="run_cnn_keras")
    args = parse_args(parser, argv)
    if args.loop == "fit":
        from tf2_impl import run_cnn_keras
        return run_cnn_keras.main(argv)
    device = resolve_device(args.device)  # before any TensorFlow op
    strategy, world = make_strategy(args, device)  # the replicas' devices: before any op too
    check_precision(args.mixed_precision, device)
    seed_everything(args.seed)  # also keras.utils.set_random_seed: initial weights, dropout
    if args.deterministic:
        make_deterministic()

    # Data: NHWC images as common.datasets gives them, Keras's layout (torch permutes
    # them to NCHW). TensorFlow copies each batch to the GPU itself: no .to(device).
    dataset = load_dataset(args.dataset, "image", args.data_dir, args.seed, args.download)
    x_train, x_val, x_test = dataset.x_train, dataset.x_val, dataset.x_test
    y_train, y_val, y_test = dataset.y_train, dataset.y_val, dataset.y_test  # int64 classes
    check_split(len(x_train), args.batch_size, world.size)  # every replica gets rows
    # --fast: tf2_impl/fast.py's versions of the feed, epoch and evaluation (same results).
    batches = fast.make_batches if args.fast else make_batches
    augment = {"augment": args.augment, "flip": may_flip(dataset)}  # training batches only
    train_epoch = fast.train_one_epoch if args.fast else train_one_epoch
    evaluate_split = fast.evaluate if args.fast else evaluate

    # Model, loss and optimizer: variables made in the scope have a copy on every replica.
    build = fast.build_cnn if args.fast else build_cnn
    with strategy.scope():
        with precision_policy(args.mixed_precision):  # the layers take Keras's dtype policy
            model = build(dataset.input_shape, dataset.num_classes, args.api, args.sync_bn)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape,
                                      dataset.num_classes)
            import_weights(model, tensors)
        steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
        optimizer = make_optimizer(model, learning_rate(args, steps_per_epoch), args.weight_decay,
                                   args.clip_grad_norm, loss_scale=args.mixed_precision == "fp16")
    loss_fn = make_loss(dataset.task, args.label_smoothing)
    # A graph (torch's step is eager); on N replicas, strategy.run on each one's rows.
    train_step = make_train_step(strategy, model, loss_fn, optimizer)
    # Keras's Dropout layers re-seeded per epoch: the masks are a function of (seed, epoch),
    # and of the replica on N replicas.
    run = TrainingRun(args, IMPLEMENTATION, dataset, device,
                      save=lambda path: save_checkpoint(path, model, optimizer),
                      load=lambda path: load_checkpoint(path, model, optimizer),
                      reseed=lambda seed: reseed_dropout(strategy, world, model, seed),
                      details={"api": args.api, "loop": args.loop},
                      lr=lambda: optimizer.learning_rate,  # a schedule's value at this step
                      world=world)  # only the chief writes
    apply_plateau(optimizer, args, run.val_losses())  # --resume: the rate of the history
    run.log.info(f"model {model.name} ({args.api} API, {model.count_params()} parameters)")

    # Training
    val_batches = batches(x_val, y_val, args.batch_size)
    for epoch in run.epochs():
        train_batches = batches(x_train, y_train, args.batch_size, args.seed, epoch, **augment)
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
