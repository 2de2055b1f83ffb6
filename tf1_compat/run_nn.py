"""Train the MLP regressor with a TF1-style graph: ``python -m tf1_compat.run_nn``.

Twins: ``torch_impl/run_nn.py`` and ``tf2_impl/run_nn.py`` (same flags, outputs
and section order); the CNN sibling is ``tf1_compat/run_cnn.py``. Datasets:
friedman (generated, default), diabetes (bundled), california (``--download``).
Keeps the epoch with the best validation loss and evaluates the test split with it.
``--fast`` changes nothing here: no speed variant measured faster for the TF1 MLP
(``tf1_compat/fast.py``), so the plain graph runs and metrics.json says so.

Define, then run: the whole computation (model, loss, Adam, Saver) is built into
one ``tf.Graph`` first; the epoch loop only feeds numpy batches to ``sess.run``.
``--replicas N``: N in-graph towers sharing the variables, one per device
(``tf1_compat/distributed.py``); tower 0 evaluates.
"""
import math

import tensorflow as tf

from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.recipes import check_precision
from common.runner import TrainingRun, run_main
from common.seed import seed_everything
from common.weights import load_weights
from tf1_compat.distributed import build_towers, tower_world
from tf1_compat.models import build_mlp, export_weights, import_weights
from tf1_compat.recipes import COMPUTE_DTYPES, LearningRate
from tf1_compat.train import (evaluate, load_checkpoint, make_batches, make_deterministic,
                              make_loss, make_optimizer, make_train_step, resolve_device,
                              save_checkpoint, session_config, train_one_epoch,
                              use_tf1_behavior)

MODULE = "tf1_compat.run_nn"
IMPLEMENTATION = "tf1_compat"
FAST_NOTE = "no speed variant measured faster for the TF1 MLP: --fast runs the plain graph"


def main(argv=None):
    parser = build_parser(MODULE, "tabular", f"Train the MLP regressor with a TF1-style graph "
                                             f"({FAST_NOTE}).", replicas=True)
    args = parse_args(parser, argv)
    device = resolve_device(args.device)
    check_precision(args.mixed_precision, device)
    seed_everything(args.seed)
    if args.deterministic:
        make_deterministic()

    # Data
    dataset = load_dataset(args.dataset, "tabular", args.data_dir, args.seed, args.download)
    x_train, x_val, x_test = dataset.x_train, dataset.x_val, dataset.x_test
    # Targets (N,) -> (N, 1), the shape of the predictions and of the targets placeholder.
    y_train, y_val, y_test = (y.reshape(-1, 1)
                              for y in (dataset.y_train, dataset.y_val, dataset.y_test))
    world = tower_world(args, device, len(x_train))  # --replicas N: N towers, N devices

    # Model, loss and optimizer
    with tf.Graph().as_default() as graph:
        tf.compat.v1.set_random_seed(args.seed)  # graph-level seed: the initial weights
        towers = build_towers(world, lambda: build_mlp(dataset.input_shape[-1],
                                                       COMPUTE_DTYPES[args.mixed_precision]),
                              lambda model: make_loss(dataset.task, model, args.label_smoothing))
        model, loss = towers.models[0], towers.losses[0]  # tower 0 evaluates and exports
        # The rate: a tensor on the global step, or the plateau rule's variable.
        lr = LearningRate(args, math.ceil(len(x_train) / args.batch_size))
        optimizer = make_optimizer(lr.tensor, args.weight_decay, args.mixed_precision)
        train_step = make_train_step(optimizer, towers, clip_grad_norm=args.clip_grad_norm)
        initialize = tf.compat.v1.global_variables_initializer()
        # Every variable: weights, Adam's slots, the global step (which the step and cosine
        # schedules read), the plateau rate, the fp16 loss scale.
        saver = tf.compat.v1.train.Saver(max_to_keep=None)
    graph.finalize()  # the loop below must not add ops (a classic TF1 slowdown)
    with tf.compat.v1.Session(graph=graph, config=session_config(device, world.size)) as sess:
        sess.run(initialize)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape)
            import_weights(sess, model, tensors)
        # No reseed: without dropout nothing in an epoch is random but the batch order.
        run = TrainingRun(args, IMPLEMENTATION, dataset, device,
                          save=lambda path: save_checkpoint(path, sess, saver),
                          load=lambda path: load_checkpoint(path, sess, saver),
                          lr=lambda: lr.start_epoch(sess, run.val_losses()),
                          details={"fast_note": FAST_NOTE} if args.fast else None, world=world)

        # Training
        for epoch in run.epochs():
            train_batches = make_batches(x_train, y_train, args.batch_size, args.seed, epoch)
            train = train_one_epoch(sess, towers, train_step, towers.loss, train_batches,
                                    dataset.task)
            val, _ = evaluate(sess, model, loss, make_batches(x_val, y_val, args.batch_size),
                              dataset.task)
            run.end_epoch(epoch, train, val)
        run.load_best()

        # Test
        test, predictions = evaluate(sess, model, loss,
                                     make_batches(x_test, y_test, args.batch_size), dataset.task)
        run.finish(test, predictions, export_weights(sess, model))


if __name__ == "__main__":
    use_tf1_behavior()  # process-wide: only an entry point may, never imported code
    run_main(main)
