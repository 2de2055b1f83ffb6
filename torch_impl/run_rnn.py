"""Train the recurrent sequence classifier in PyTorch: ``python -m torch_impl.run_rnn``.

Twins: ``tf2_impl/run_rnn.py`` (GradientTape), ``tf2_impl/run_rnn_keras.py`` (``fit``)
and ``tf1_compat/run_rnn.py`` (same flags, outputs and section order); the image
sibling is ``torch_impl/run_cnn.py``. Each image is read as a sequence, one row per
time step (digits: 8 steps of 8 features, bundled, default; synthetic and cifar10:
32 steps of 96). ``--cell lstm|gru`` picks the recurrent layer, ``--bidirectional``
reads both ways. Keeps the epoch with the best validation loss and evaluates the
test split with it. ``--fast`` uses ``torch_impl/fast.py``.
"""
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from common.cli import build_parser, parse_args
from common.datasets import load_dataset
from common.distributed import check_split
from common.recipes import check_precision
from common.runner import TrainingRun, run_main
from common.seed import seed_everything
from common.weights import load_weights, model_options
from torch_impl import distributed, fast
from torch_impl.rnn_models import build_rnn, export_weights, import_weights
from torch_impl.train import (evaluate, load_checkpoint, make_batches, make_deterministic,
                              make_loss, make_optimizer, make_scaler, make_scheduler,
                              save_checkpoint, step_epoch_scheduler,
                              train_one_epoch)

MODULE = "torch_impl.run_rnn"
IMPLEMENTATION = "torch"


def main(argv=None):
    args = parse_args(build_parser(MODULE, "sequence", "Train the LSTM/GRU classifier with PyTorch."),
                      argv)
    # torchrun starts one process per replica (WORLD_SIZE > 1): each joins the process group
    # here and leaves it when the block ends; plain `python -m` runs alone (world SINGLE).
    with distributed.process_group(args) as (world, device):
        check_precision(args.mixed_precision, device)
        seed_everything(args.seed)
        if args.deterministic:
            make_deterministic()

        # Data: (N, T, F) sequences, batch first, as the model's batch_first=True layer takes them.
        dataset = load_dataset(args.dataset, "sequence", args.data_dir, args.seed, args.download)
        check_split(len(dataset.x_train), args.batch_size, world.size)
        # The DataLoader moves each batch to the device; --fast moves each split there once.
        home = device if args.fast else torch.device("cpu")
        x_train, x_val, x_test = (torch.from_numpy(x).to(home)
                                  for x in (dataset.x_train, dataset.x_val, dataset.x_test))
        y_train, y_val, y_test = (torch.from_numpy(y).to(home)  # int64 class indices
                                  for y in (dataset.y_train, dataset.y_val, dataset.y_test))
        batches = fast.make_batches if args.fast else make_batches

        # Model, loss and optimizer
        num_features = dataset.input_shape[-1]
        model = build_rnn(num_features, dataset.num_classes, args.cell,
                          args.bidirectional).to(device)
        if args.weights:
            tensors, _ = load_weights(args.weights, dataset.task, dataset.input_shape,
                                      dataset.num_classes, **model_options(args))
            import_weights(model, tensors)
        loss_fn = make_loss(dataset.task, args.label_smoothing)
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        scheduler = make_scheduler(optimizer, args, math.ceil(len(x_train) / args.batch_size))
        scaler = make_scaler(args.mixed_precision, device)
        # No reseed: the recurrent layers have no dropout (nn.LSTM/nn.GRU's dropout= is 0).
        run = TrainingRun(
            args, IMPLEMENTATION, dataset, str(device), world=world,
            save=lambda path: save_checkpoint(path, model, optimizer, scheduler, scaler),
            load=lambda path: load_checkpoint(path, model, optimizer, scheduler, scaler),
            lr=lambda: optimizer.param_groups[0]["lr"], details=model_options(args))
        # DDP broadcasts rank 0's weights now and averages the gradients in every backward().
        # Wrapped after TrainingRun has resumed, and only for training: checkpoints and
        # evaluation use `model` itself (no "module." prefix), so a run resumes with any N.
        ddp_model = DistributedDataParallel(model) if world.size > 1 else model

        # Training
        val_batches = batches(x_val, y_val, args.batch_size)
        for epoch in run.epochs():
            train_batches = batches(x_train, y_train, args.batch_size, args.seed, epoch)
            if world.size > 1:  # this rank's rows of each batch; a signal stops all at one batch
                train_batches = run.until_stopped(distributed.shard_batches(train_batches, world),
                                                  distributed.any_rank)
            train = train_one_epoch(ddp_model, train_batches, loss_fn, optimizer, dataset.task,
                                    scheduler=scheduler, clip_grad_norm=args.clip_grad_norm,
                                    precision=args.mixed_precision, scaler=scaler, world=world)
            val, _ = evaluate(model, val_batches, loss_fn, dataset.task, args.mixed_precision)
            if world.size > 1:  # rank 0's numbers: early stop and plateau decide alike
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
