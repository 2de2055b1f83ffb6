"""Train the project's CNN or MLP with the scratch Tensor: ``python -m scratch.train --task cnn``.

The twins of ``torch_impl/run_cnn.py`` and ``torch_impl/run_nn.py`` on numpy alone:
the shared data layer (``common.datasets``), the shared flags (``common.cli``), the
shared outputs and bookkeeping (``common.runner.TrainingRun``: ``metrics.json``,
``predictions.csv``, ``curves.png``, ``weights.safetensors``, ``--resume``). Checkpoints
are ``.npz`` files of the model's and Adam's arrays. Everything runs on the CPU in float64;
the defaults are small (CNN: 5 epochs of batch 32 on digits, a few seconds each).
"""
import argparse
from pathlib import Path

import numpy as np

from common.cli import build_parser, parse_args
from common.datasets import batch_indices, load_dataset
from common.errors import UserError, WeightsError
from common.layout import nhwc_to_nchw
from common.outputs import atomic_path, classification_metrics, regression_metrics
from common.runner import TrainingRun, run_main
from common.weights import load_weights
from scratch import functional as F
from scratch.nn import Adam, build_cnn, build_mlp, export_weights, import_weights
from scratch.tensor import Tensor, no_grad

MODULE = "scratch.train"
IMPLEMENTATION = "scratch"
TASKS = {"cnn": ("image", dict(epochs=5, batch_size=32)),
         "mlp": ("tabular", dict(epochs=20, batch_size=32))}


def make_parser(argv):
    """The shared flags of the task named by --task (cnn: images, mlp: tables)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=tuple(TASKS), default="cnn")
    task = pre.parse_known_args(argv)[0].task
    kind, defaults = TASKS[task]
    parser = build_parser(MODULE, kind, "Train the CNN or the MLP with the numpy-only scratch "
                                        "Tensor.")
    parser.add_argument("--task", choices=tuple(TASKS), default="cnn",
                        help="cnn: the image classifier; mlp: the regressor")
    parser.set_defaults(**defaults)
    return parser


def loss_fn(task, outputs, targets):
    if task == "classification":
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets.reshape(-1, 1))


def train_one_epoch(model, optimizer, x, y, task, batches):
    """One pass over the batches; {"loss", "accuracy" | "mse"} averaged over the rows."""
    model.train()
    total, correct = 0.0, 0
    for index in batches:
        optimizer.zero_grad()
        outputs = model(Tensor(x[index], requires_grad=False))
        loss = loss_fn(task, outputs, y[index])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(index)
        if task == "classification":
            correct += int((outputs.data.argmax(axis=1) == y[index]).sum())
    loss = total / len(x)
    return {"loss": loss, "accuracy": correct / len(x)} if task == "classification" else \
        {"loss": loss, "mse": loss}


@no_grad()
def evaluate(model, x, y, task, batch_size):
    """(metrics, outputs) on one split in evaluation mode (running batch-norm statistics)."""
    model.eval()
    outputs = np.concatenate([model(Tensor(x[i], requires_grad=False)).data
                              for i in batch_indices(len(x), batch_size, 0, 0, shuffle=False)])
    loss = loss_fn(task, Tensor(outputs, requires_grad=False), y).item()
    if task == "classification":
        return classification_metrics(outputs, y, loss), outputs
    return regression_metrics(outputs, y, loss), outputs


def save_checkpoint(path, model, optimizer):
    """Model and Adam arrays in ``<path>.npz``, written atomically."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"adam/{k}": v for k, v in optimizer.state_dict().items()})
    with atomic_path(Path(path).with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_checkpoint(path, model, optimizer):
    file = Path(path).with_suffix(".npz")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        import_weights(model, {k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
        optimizer.load_state_dict({k[5:]: v for k, v in arrays.items() if k.startswith("adam/")})
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"checkpoint {file} cannot be read ({exc})") from None


def main(argv=None):
    args = parse_args(make_parser(argv), argv)
    if args.device == "cuda":
        raise UserError("scratch runs on the CPU with numpy; use --device cpu or auto")
    if args.fast:
        raise UserError("scratch has no --fast variant; run it without --fast")
    F.manual_seed(args.seed)

    # Data
    dataset = load_dataset(args.dataset, args.kind, args.data_dir, args.seed, args.download)
    prepare = nhwc_to_nchw if args.kind == "image" else np.asarray  # the CNN takes NCHW
    x_train, x_val, x_test = (prepare(x).astype(np.float64)
                              for x in (dataset.x_train, dataset.x_val, dataset.x_test))
    task = dataset.task

    # Model, loss and optimizer
    if task == "classification":
        model = build_cnn(dataset.input_shape, dataset.num_classes)
    else:
        model = build_mlp(dataset.input_shape[-1])
    if args.weights:
        tensors, _ = load_weights(args.weights, task, dataset.input_shape, dataset.num_classes)
        import_weights(model, tensors)
    optimizer = Adam(model.parameters(), lr=args.lr)
    run = TrainingRun(args, IMPLEMENTATION, dataset, "cpu",
                      save=lambda path: save_checkpoint(path, model, optimizer),
                      load=lambda path: load_checkpoint(path, model, optimizer),
                      reseed=F.manual_seed)

    # Training
    for epoch in run.epochs():
        batches = batch_indices(len(x_train), args.batch_size, args.seed, epoch)
        train = train_one_epoch(model, optimizer, x_train, dataset.y_train, task, batches)
        val, _ = evaluate(model, x_val, dataset.y_val, task, args.batch_size)
        run.end_epoch(epoch, train, val)
    run.load_best()

    # Test
    test, outputs = evaluate(model, x_test, dataset.y_test, task, args.batch_size)
    run.finish(test, outputs, export_weights(model))


if __name__ == "__main__":
    run_main(main)
