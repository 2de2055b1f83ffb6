"""Train the CNN image classifier in PyTorch: ``python -m torch_impl.run_cnn``.

Twins: ``tf2_impl/run_cnn.py`` and ``tf1_compat/run_cnn.py`` (same flags, outputs
and section order); the MLP sibling is ``torch_impl/run_nn.py``. Datasets: digits
(bundled, default), synthetic, cifar10 (``--download``). Keeps the epoch with the
best validation loss and evaluates the test split with it.
"""
import time

import torch

from common import config
from common.cli import build_parser, parse_args
from common.datasets import batch_indices, load_dataset
from common.layout import nhwc_to_nchw
from common.memory import keep_freed_memory
from common.runner import TrainingRun, run_main
from common.seed import epoch_seed, seed_everything
from common.weights import load_weights
from torch_impl.models import CNNClassifier, export_weights, import_weights
from torch_impl.train import (evaluate, load_checkpoint, make_deterministic, resolve_device,
                              save_checkpoint, to_device, train_one_epoch)

MODULE = "torch_impl.run_cnn"
IMPLEMENTATION = "torch"


def main(argv=None):
    parser = build_parser(MODULE, "image", "Train the CNN classifier with PyTorch.")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (tens of seconds of compiling first; "
                             "on 2 CPU cores it was no faster than eager)")
    args = parse_args(parser, argv)
    device = resolve_device(args.device)
    keep_freed_memory()  # large activations are reused, not returned to the kernel (common.memory)
    seed_everything(args.seed)
    if args.deterministic:
        make_deterministic()

    dataset = load_dataset(args.dataset, "image", args.data_dir, args.seed, args.download)
    run = TrainingRun(args, IMPLEMENTATION, dataset, str(device))
    # common gives NHWC; torch's convolutions take NCHW. channels_last keeps the NCHW
    # shape but stores pixels channel-innermost, the layout of oneDNN's (and cuDNN's)
    # fastest convolution kernels: 1.5x less CPU time per training step here.
    x_train = to_device(nhwc_to_nchw(dataset.x_train), device, torch.channels_last)
    x_val = to_device(nhwc_to_nchw(dataset.x_val), device, torch.channels_last)
    x_test = to_device(nhwc_to_nchw(dataset.x_test), device, torch.channels_last)
    y_train, y_val, y_test = (to_device(y, device) for y in (dataset.y_train, dataset.y_val, dataset.y_test))

    model = CNNClassifier(dataset.input_shape, dataset.num_classes)
    model = model.to(device, memory_format=torch.channels_last)
    if args.weights:
        tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape, dataset.num_classes)
        import_weights(model, tensors)
    # The compiled module shares its parameters with `model`; state_dicts come from `model`.
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr,
                                 betas=(config.ADAM_BETA1, config.ADAM_BETA2), eps=config.ADAM_EPS)
    if run.last_checkpoint:  # --resume after a saved epoch
        load_checkpoint(run.checkpoint_file(run.last_checkpoint), model, optimizer)

    if not args.eval_only:
        for epoch in run.epochs():
            torch.manual_seed(epoch_seed(args.seed, epoch))  # dropout masks, as after --resume
            batches = batch_indices(len(x_train), args.batch_size, args.seed, epoch)
            start = time.perf_counter()
            train = train_one_epoch(step_model, optimizer, x_train, y_train, batches, dataset.task,
                                    after_batch=lambda: run.check_stop(epoch),
                                    desc=f"epoch {epoch}/{args.epochs}")
            seconds = time.perf_counter() - start
            val, _ = evaluate(step_model, x_val, y_val, dataset.task, args.batch_size)
            is_best = run.end_epoch(epoch, train, val, seconds)
            last = save_checkpoint(run.checkpoint_path("last", epoch, ".pt"), model, optimizer, epoch)
            best = save_checkpoint(run.checkpoint_path("best", epoch, ".pt"), model) if is_best else None
            run.save_state(last, best)
        load_checkpoint(run.checkpoint_file(run.best_checkpoint), model)

    test, logits = evaluate(step_model, x_test, y_test, dataset.task, args.batch_size)
    run.finish(test, logits, export_weights(model))


if __name__ == "__main__":
    run_main(main)
