"""How far torch's float32 results on a device are from float64 on the CPU:
``python -m tools.device_parity --device cuda``.

For the MLP and the CNN, from the same random weights and batches: the forward pass
(inference mode), the gradients of the loss, and the weights after 10 Adam steps (batch
statistics; dropout off, since each device draws its own masks). Each is computed in
float32 on --device and in float64 on the CPU. Forward passes and gradients are reported
as the largest difference relative to the tensor's largest entry; the Adam steps as the
largest absolute difference (each step moves a weight by about the learning rate, 1e-3,
whatever the gradient's size, so tiny gradients magnify float32 noise). On CUDA the same forward pass and gradients are
also measured with TF32 allowed (torch's default for convolutions), and the Adam steps run
twice under ``make_deterministic`` to check that they are bitwise equal. torch only: it runs
on GPU machines that have no TensorFlow; ``pytest --device cuda`` asserts its tolerances.
"""
import argparse
import json
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from common import layout
from common.runner import run_main
from torch_impl import models, train

INPUT_SHAPE, CLASSES, FEATURES, ROWS, STEPS, LR = (32, 32, 3), 10, 10, 20, 10, 1e-3
TASK = {"cnn": "classification", "mlp": "regression"}


def make_batches(task, steps=STEPS):
    """`steps` (x, y) numpy batches of ROWS rows: NCHW images and class indices, or rows."""
    batches = []
    for seed in range(steps):
        rng = np.random.default_rng(seed)
        if task == "cnn":
            x = layout.nhwc_to_nchw(rng.normal(size=(ROWS, *INPUT_SHAPE)).astype(np.float32))
            batches.append((x, rng.integers(0, CLASSES, ROWS)))
        else:
            x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
            batches.append((x, rng.normal(size=(ROWS, 1)).astype(np.float32)))
    return batches


def make_weights(task, seed=0):
    """A fresh model's weights in the shared format (float32 numpy)."""
    torch.manual_seed(seed)
    model = models.build_cnn(INPUT_SHAPE, CLASSES) if task == "cnn" else models.build_mlp(FEATURES)
    return models.export_weights(model)


def build(task, weights, device, dtype):
    """The model with `weights`, on `device` in `dtype`, dropout off."""
    model = models.build_cnn(INPUT_SHAPE, CLASSES) if task == "cnn" else models.build_mlp(FEATURES)
    models.import_weights(model, weights)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.to(device=device, dtype=dtype)


def _tensors(x, y, device, dtype):
    targets = torch.from_numpy(y).to(device)
    return (torch.from_numpy(x).to(device=device, dtype=dtype),
            targets if targets.dtype == torch.int64 else targets.to(dtype))


def forward(task, weights, x, device, dtype):
    model = build(task, weights, device, dtype).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(device=device, dtype=dtype)).double().cpu().numpy()


def gradients(task, weights, x, y, device, dtype):
    model = build(task, weights, device, dtype).eval()
    inputs, targets = _tensors(x, y, device, dtype)
    train.make_loss(TASK[task])(model(inputs), targets).backward()
    return {name: p.grad.double().cpu().numpy() for name, p in model.named_parameters()}


def adam_steps(task, weights, batches, device, dtype):
    """The shared-format weights after one Adam step per batch (train mode)."""
    model = build(task, weights, device, dtype).train()
    loss_fn, optimizer = train.make_loss(TASK[task]), train.make_optimizer(model, LR)
    for x, y in batches:
        inputs, targets = _tensors(x, y, device, dtype)
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    return {k: v.double().cpu().numpy() for k, v in model.state_dict().items()
            if v.is_floating_point()}


def difference(got, expected, relative=True):
    """max |got - expected|, divided by max |expected| if `relative`, over every tensor of
    two dicts (or two arrays)."""
    if not isinstance(expected, dict):
        got, expected = {"": got}, {"": expected}
    scale = lambda v: max(np.abs(v).max(), 1e-12) if relative else 1.0  # noqa: E731
    return max(float(np.abs(got[k] - expected[k]).max() / scale(expected[k])) for k in expected)


@contextmanager
def tf32(allowed):
    """TF32 allowed or not for torch's matrix products and convolutions, then as before."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def measure(task, device):
    """{"forward", "gradients", "adam"} differences, float32 on `device` with TF32 off
    against float64 on the CPU; on CUDA also "forward_tf32", "gradients_tf32" and
    "adam_bitwise" (two deterministic runs equal)."""
    weights, batches = make_weights(task), make_batches(task)
    x, y = batches[0]
    reference = {"forward": forward(task, weights, x, "cpu", torch.float64),
                 "gradients": gradients(task, weights, x, y, "cpu", torch.float64),
                 "adam": adam_steps(task, weights, batches, "cpu", torch.float64)}
    with tf32(False):
        got = {"forward": forward(task, weights, x, device, torch.float32),
               "gradients": gradients(task, weights, x, y, device, torch.float32),
               "adam": adam_steps(task, weights, batches, device, torch.float32)}
    figures = {key: difference(got[key], reference[key], key != "adam") for key in reference}
    if device == "cuda":
        with tf32(True):
            figures["forward_tf32"] = difference(
                forward(task, weights, x, device, torch.float32), reference["forward"])
            figures["gradients_tf32"] = difference(
                gradients(task, weights, x, y, device, torch.float32), reference["gradients"])
        train.make_deterministic()
        runs = [adam_steps(task, weights, batches, device, torch.float32) for _ in range(2)]
        figures["adam_bitwise"] = all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.device_parity", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args(argv)
    device = str(train.resolve_device(args.device))
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    figures = {task: measure(task, device) for task in TASK}
    for task, values in figures.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in values.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "figures": figures}, f, indent=1)


if __name__ == "__main__":
    run_main(main)
