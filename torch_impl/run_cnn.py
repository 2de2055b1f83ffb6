"""Train the CNN image classifier in PyTorch: ``python -m torch_impl.run_cnn``.

Twins: ``tf2_impl/run_cnn.py`` and ``tf1_compat/run_cnn.py`` (same flags, outputs
and section order); the MLP sibling is ``torch_impl/run_nn.py``. Datasets: digits
(bundled, default), synthetic, cifar10 (``--download``). Keeps the epoch with the
best validation loss and evaluates the test split with it. ``--fast`` uses
``torch_impl/fast.py``.
"""
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.distributed import check_split
from common.layout import nhwc_to_nchw
from common.recipes import check_precision, may_flip
from common.runner import TrainingRun, run_main
from common.seed import seed_everything
from common.weights import load_weights
from torch_impl import distributed, fast
from torch_impl.models import build_cnn, export_weights, import_weights
from torch_impl.train import (evaluate, load_checkpoint, make_batches, make_deterministic,
                              make_loss, make_optimizer, make_scaler, make_scheduler,
                              save_checkpoint, step_epoch_scheduler,
                              train_one_epoch)

MODULE = "torch_impl.run_cnn"
IMPLEMENTATION = "torch"


def main(argv=None):
    args = parse_args(build_parser(MODULE, "image", "Train the CNN classifier with PyTorch."), argv)
    # torchrun starts one process per replica (WORLD_SIZE > 1): each joins the process group
    # here and leaves it when the block ends; plain `python -m` runs alone (world SINGLE).
    with distributed.process_group(args) as (world, device):
        check_precision(args.mixed_precision, device)
        seed_everything(args.seed)
        if args.deterministic:
            make_deterministic()
        if args.fast:
            fast.keep_freed_memory()

        # Data
        dataset = load_dataset(args.dataset, "image", args.data_dir, args.seed, args.download)
        check_split(len(dataset.x_train), args.batch_size, world.size)
        # common.datasets gives NHWC images, the TF twins' layout; torch's convolutions take NCHW.
        # The DataLoader moves each batch to the device; --fast moves each split there once.
        home = device if args.fast else torch.device("cpu")
        x_train, x_val, x_test = (torch.from_numpy(nhwc_to_nchw(x)).to(home)
                                  for x in (dataset.x_train, dataset.x_val, dataset.x_test))
        y_train, y_val, y_test = (torch.from_numpy(y).to(home)  # int64 class indices
                                  for y in (dataset.y_train, dataset.y_val, dataset.y_test))
        batches = fast.make_batches if args.fast else make_batches

        # Model, loss and optimizer
        build = fast.build_cnn if args.fast else build_cnn
        model = build(dataset.input_shape, dataset.num_classes).to(device)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape,
                                      dataset.num_classes)
            import_weights(model, tensors)
        loss_fn = make_loss(dataset.task, args.label_smoothing)
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        scheduler = make_scheduler(optimizer, args, math.ceil(len(x_train) / args.batch_size))
        scaler = make_scaler(args.mixed_precision, device)
        # torch.manual_seed per epoch: the dropout masks are a function of (seed, epoch), and
        # of the rank under DDP (replica_seed: epoch_seed + rank), else every replica would
        # drop the same units.
        run = TrainingRun(
            args, IMPLEMENTATION, dataset, str(device), world=world,
            save=lambda path: save_checkpoint(path, model, optimizer, scheduler, scaler),
            load=lambda path: load_checkpoint(path, model, optimizer, scheduler, scaler),
            lr=lambda: optimizer.param_groups[0]["lr"],
            reseed=lambda seed: torch.manual_seed(seed + world.rank))
        # Batch norm over all replicas' rows with --sync-bn (DDP's default: each its own).
        if args.sync_bn:
            distributed.sync_batch_norm(model, world, run.log)
        # DDP broadcasts rank 0's weights and buffers now, the buffers (batch norm's running
        # statistics) again before every training forward, and averages the gradients in every
        # backward(). Wrapped after TrainingRun has resumed, and only for training: checkpoints
        # and evaluation use `model` itself (no "module." prefix), so a run resumes with any N.
        ddp_model = DistributedDataParallel(model) if world.size > 1 else model

        # Training
        val_batches = batches(x_val, y_val, args.batch_size)
        for epoch in run.epochs():
            train_batches = batches(x_train, y_train, args.batch_size, args.seed, epoch,
                                    args.augment, may_flip(dataset))
            if world.size > 1:  # this rank's rows of each batch; a signal stops all at one batch
                train_batches = run.until_stopped(distributed.shard_batches(train_batches, world),
                                                  distributed.any_rank)
            train = train_one_epoch(ddp_model, train_batches, loss_fn, optimizer, dataset.task,
                                    scheduler=scheduler, clip_grad_norm=args.clip_grad_norm,
                                    precision=args.mixed_precision, scaler=scaler, world=world)
            val, _ = evaluate(model, val_batches, loss_fn, dataset.task, args.mixed_precision)
            if world.size > 1:
                # Rank 0's numbers, so that early stop and plateau decide alike everywhere. Its
                # running statistics are the checkpoint's; without --sync-bn they have seen only
                # rank 0's rows (DDP overwrites the others' with them before each forward).
                val = distributed.from_rank0(val)
            step_epoch_scheduler(scheduler, val["loss"])
            run.end_epoch(epoch, train, val)
        run.load_best()

        # Test
        test, logits = evaluate(model, batches(x_test, y_test, args.batch_size), loss_fn,
                                dataset.task, args.mixed_precision)
        run.finish(test, logits, export_weights(model))


if __name__ == "__main__":
    run_main(main)
