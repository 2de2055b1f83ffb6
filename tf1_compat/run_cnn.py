"""Train the CNN image classifier with a TF1-style graph: ``python -m tf1_compat.run_cnn``.

Twins: ``torch_impl/run_cnn.py`` and ``tf2_impl/run_cnn.py`` (same flags, outputs
and section order); the MLP sibling is ``tf1_compat/run_nn.py``. Datasets: digits
(bundled, default), synthetic, cifar10 (``--download``). Keeps the epoch with the
best validation loss and evaluates the test split with it.

Define, then run: the whole computation (model, loss, Adam, savers) is built into
one ``tf.Graph`` first; the epoch loop only feeds numpy batches to ``sess.run``.
"""
import time

import tensorflow as tf

from common.cli import build_parser, parse_args
from common.datasets import batch_indices, load_dataset
from common.runner import TrainingRun, run_main
from common.seed import epoch_seed, seed_everything
from common.weights import load_weights
from tf1_compat.models import build_cnn_classifier, export_weights, import_weights
from tf1_compat.train import (adam_train_op, evaluate, load_checkpoint, make_deterministic,
                              resolve_device, save_checkpoint, session_config, train_one_epoch,
                              use_tf1_behavior)

MODULE = "tf1_compat.run_cnn"
IMPLEMENTATION = "tf1_compat"


def main(argv=None):
    parser = build_parser(MODULE, "image", "Train the CNN classifier with a TF1-style graph.")
    args = parse_args(parser, argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    if args.deterministic:
        make_deterministic()

    dataset = load_dataset(args.dataset, "image", args.data_dir, args.seed, args.download)
    run = TrainingRun(args, IMPLEMENTATION, dataset, device)
    # common gives NHWC, the layout TF's convolutions take: fed as it is.
    x_train, y_train = dataset.x_train, dataset.y_train
    x_val, y_val = dataset.x_val, dataset.y_val
    x_test, y_test = dataset.x_test, dataset.y_test

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(args.seed)  # graph-level seed: the initial weights
        model = build_cnn_classifier(dataset.input_shape, dataset.num_classes)
        train_op = adam_train_op(model, args.lr)
        initialize = tf.compat.v1.global_variables_initializer()
        # last: every global variable (weights, moving averages, Adam's m and v slots and
        # beta powers), to resume; best: the model's variables only.
        last_saver = tf.compat.v1.train.Saver(max_to_keep=None)
        best_saver = tf.compat.v1.train.Saver(var_list=model.variables, max_to_keep=None)
    graph.finalize()  # the loop below must not add ops (a classic TF1 slowdown)

    with tf.compat.v1.Session(graph=graph, config=session_config(device)) as sess:
        sess.run(initialize)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape,
                                      dataset.num_classes)
            import_weights(sess, model, tensors)
        if run.last_checkpoint:  # --resume after a saved epoch
            load_checkpoint(run.checkpoint_file(run.last_checkpoint), sess, last_saver)

        if not args.eval_only:
            for epoch in run.epochs():
                seed = epoch_seed(args.seed, epoch)  # dropout masks, as after --resume
                batches = batch_indices(len(x_train), args.batch_size, args.seed, epoch)
                start = time.perf_counter()
                train = train_one_epoch(sess, model, train_op, x_train, y_train, batches,
                                        dataset.task, dropout_seed=seed,
                                        after_batch=lambda: run.check_stop(epoch),
                                        desc=f"epoch {epoch}/{args.epochs}")
                seconds = time.perf_counter() - start
                val, _ = evaluate(sess, model, x_val, y_val, dataset.task, args.batch_size)
                is_best = run.end_epoch(epoch, train, val, seconds)
                last = save_checkpoint(run.checkpoint_path("last", epoch), sess, last_saver)
                best = save_checkpoint(run.checkpoint_path("best", epoch), sess,
                                       best_saver) if is_best else None
                run.save_state(last, best)
            load_checkpoint(run.checkpoint_file(run.best_checkpoint), sess, best_saver)

        test, logits = evaluate(sess, model, x_test, y_test, dataset.task, args.batch_size)
        run.finish(test, logits, export_weights(sess, model))


if __name__ == "__main__":
    use_tf1_behavior()  # process-wide: only entry points may, never imported code
    run_main(main)
