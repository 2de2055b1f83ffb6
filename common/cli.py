"""The command line every ``run_*`` module shares.

``build_parser`` gives the shared flags, ``--fast`` among them (each framework's
``fast.py`` variants); TF2 adds ``--api``/``--loop`` before ``parse_args``.
Nonsense values are rejected by the parser itself, with the valid choices.
"""
import argparse
import json
import time
from pathlib import Path

from common import config, recipes
from common.datasets import DATASETS
from common.errors import UserError

RUN_CONFIG = "run_config.json"
# Chosen again at every launch (like torchrun's process count): --resume keeps the
# command line's value, so an interrupted run can go on with another number of replicas.
RELAUNCH = ("replicas",)
MAX_LR = 1e37


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def learning_rate(text):
    """A positive float at most 1e37: Adam's first step is lr / (1 - beta1) = 10 lr, and
    torch refuses a step size beyond float32's range (3.4e38) with a traceback."""
    value = positive_float(text)
    if value > MAX_LR:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_LR:g} (float32 overflows in the optimizer step), got {text}")
    return value


def build_parser(module, kind, description, replicas=False):
    """The shared flags. `module` names the entry point (for --out), `kind` is
    "image" (CNN, which also takes --sync-bn), "tabular" (MLP) or "sequence" (the
    recurrent classifier, which also takes --cell and --bidirectional). `replicas`:
    the TF entry points' --replicas (torch starts its replicas with torchrun)."""
    datasets = DATASETS[kind]
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.set_defaults(module=module, kind=kind)
    parser.add_argument("--dataset", default="auto", choices=datasets,
                        help="auto: the real dataset when it is on disk, else the bundled one")
    parser.add_argument("--data-dir", default="./data", help="where datasets are kept (./data)")
    parser.add_argument("--download", action="store_true", help="allow downloading the dataset")
    parser.add_argument("--epochs", type=positive_int, default=config.EPOCHS)
    parser.add_argument("--batch-size", type=positive_int, default=config.BATCH_SIZE)
    lr = config.RNN_LEARNING_RATE if kind == "sequence" else config.LEARNING_RATE
    parser.add_argument("--lr", type=learning_rate, default=lr,
                        help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=config.SEED)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto uses a GPU when one is present")
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/<module>-<dataset>-<time>)")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="start from a shared-format weights.safetensors file")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate --weights on the test split without training")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue an interrupted run in its --out directory")
    parser.add_argument("--deterministic", action="store_true",
                        help="seeded, deterministic kernels: same seed, same numbers")
    parser.add_argument("--fast", action="store_true",
                        help="the measured speed variants of this framework's fast.py (same "
                             "function, proven by the parity tests)")
    recipes.add_recipe_arguments(parser, positive_int, positive_float)
    if replicas:
        parser.add_argument("--replicas", type=positive_int, default=1,
                            help="data-parallel replicas in this process: N GPUs, else N "
                                 "logical CPUs (--batch-size stays the global batch)")
    if kind == "image":
        parser.add_argument("--sync-bn", action="store_true",
                            help="data-parallel: batch norm uses the moments of all replicas' "
                                 "rows (default: each replica's own, as DDP and Keras do)")
    if kind == "sequence":
        parser.add_argument("--cell", default="lstm", choices=config.RNN_CELLS,
                            help="the recurrent layer: LSTM or GRU")
        parser.add_argument("--bidirectional", action="store_true",
                            help="read each sequence forwards and backwards")
    return parser


def parse_args(parser, argv=None):
    """Parse, check the combinations, and fill in --out (or the saved config of --resume)."""
    args = parser.parse_args(argv)
    if args.resume:
        saved = Path(args.resume) / RUN_CONFIG
        if not saved.is_file():
            raise UserError(f"{args.resume} holds no {RUN_CONFIG}; --resume takes the --out "
                            f"directory of an interrupted run")
        stored = json.loads(saved.read_text())
        if stored.get("module") != args.module:
            raise UserError(f"{args.resume} was written by {stored.get('module')}, not "
                            f"{args.module}; resume it with python -m {stored.get('module')}")
        resume, launch = args.resume, {k: v for k, v in vars(args).items() if k in RELAUNCH}
        args = argparse.Namespace(**{**vars(args), **stored, **launch})
        args.resume, args.out = resume, resume
    recipes.check_recipe_arguments(args)
    if args.eval_only and not args.weights:
        raise UserError("--eval-only needs --weights PATH (a weights.safetensors file to evaluate)")
    if args.out is None:
        name = args.module.replace(".", "-")
        args.out = str(Path("runs") / f"{name}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def saved_config(args):
    """The arguments --resume restores (everything but --resume itself)."""
    return {k: v for k, v in vars(args).items() if k != "resume"}
