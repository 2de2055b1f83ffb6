"""The bookkeeping every ``run_*`` entry point shares, framework-free.

``run_main(main)`` turns errors into exit codes: 2 with one sentence for bad
input, 3 for a non-finite loss, 130/143 after SIGINT/SIGTERM. ``TrainingRun``
owns the output directory: run config, per-epoch history and summary lines,
best-validation tracking, the resumable state, and the final outputs. Model,
optimizer and checkpoints stay in each implementation, in its own idiom.

Resuming works at epoch boundaries: at the end of every epoch the runner saves a
checkpoint of model and optimizer, then ``state.json`` naming it. On a signal,
the current batch finishes, the epoch is abandoned and the run exits; ``--resume``
restarts that epoch from the last complete one. Batch order and dropout seeds
are functions of (seed, epoch), so no RNG state is needed to continue exactly.
"""
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from common import cli
from common.errors import Interrupted, NonFiniteLossError, UserError
from common.outputs import (plot_curves, predictions_csv, setup_logger, write_json,
                            atomic_write_text)
from common.weights import save_weights, weights_metadata

STATE = "state.json"
CHECKPOINTS = "checkpoint"


def run_main(main, argv=None):
    """Call ``main(argv)`` and exit the way the command line promises."""
    try:
        main(argv)
        late = StopFlag.active
        if late is not None and late.requested:
            # The signal came after the last check (final evaluation, writing outputs):
            # the outputs are complete, but the shell still learns the run was interrupted.
            print(f"{signal.Signals(late.signum).name} received while finishing; the outputs "
                  f"were written completely", file=sys.stderr)
            sys.exit(128 + late.signum)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if StopFlag.active is not None:
            StopFlag.active.uninstall()


class StopFlag:
    """Set by SIGINT/SIGTERM; training loops look at it after every batch."""

    active = None  # the flag whose handlers are installed, for run_main

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        self.signum = signum

    def install(self):
        if StopFlag.active is not None and StopFlag.active is not self:
            StopFlag.active.uninstall()
        if StopFlag.active is None:
            self._previous = {s: signal.signal(s, self._handle)
                              for s in (signal.SIGINT, signal.SIGTERM)}
            StopFlag.active = self

    def uninstall(self):
        """Give the signals back to whoever handled them before (pytest, a caller)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if StopFlag.active is self:
            StopFlag.active = None


class TrainingRun:
    """One run's output directory, history and resumable state."""

    def __init__(self, args, implementation, dataset, device):
        self.args = args
        self.implementation = implementation
        self.dataset = dataset
        self.device = device
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CHECKPOINTS).mkdir(exist_ok=True)
        self.log = setup_logger(self.out, args.module)
        self.task = dataset.task
        self.metric = "accuracy" if self.task == "classification" else "mse"
        self.history = []
        self.best_val_loss = math.inf
        self.best_epoch = 0
        self.best_checkpoint = None
        self.last_checkpoint = None
        self.train_seconds = []
        self.start_time = time.perf_counter()
        self.stop = StopFlag()
        self.stop.install()  # from the start: a signal during set-up stops at the first batch
        if args.resume:
            self._load_state()
        else:
            write_json(self.out / cli.RUN_CONFIG, cli.saved_config(args))
        if dataset.extra.get("note"):
            self.log.info(dataset.extra["note"])
        self.log.info(f"{args.module}: {dataset.name} ({dataset.source}), train/val/test "
                      f"{len(dataset.x_train)}/{len(dataset.x_val)}/{len(dataset.x_test)}, "
                      f"device {device}, output {self.out}")

    # -- resumable state ---------------------------------------------------------------
    def _load_state(self):
        path = self.out / CHECKPOINTS / STATE
        if not path.is_file():
            # Stopped before its first epoch ended: nothing was saved, and since every
            # run is seeded, starting over is what the uninterrupted run did.
            self.log.info(f"{self.out} stopped before its first epoch ended: starting it "
                          f"again from epoch 1")
            return
        state = json.loads(path.read_text())
        self.history = state["history"]
        self.best_val_loss = state["best_val_loss"]
        self.best_epoch = state["best_epoch"]
        self.best_checkpoint = state["best_checkpoint"]
        self.last_checkpoint = state["last_checkpoint"]
        self.train_seconds = state.get("train_seconds", [])
        self.log.info(f"resuming {self.out} after epoch {self.epochs_done}")

    @property
    def epochs_done(self):
        return len(self.history)

    def epochs(self):
        """The epochs still to train (1-based)."""
        self.stop.install()
        return range(self.epochs_done + 1, self.args.epochs + 1)

    def checkpoint_path(self, kind, epoch, suffix=""):
        """A fresh name per epoch: state.json only ever names complete files."""
        return self.out / CHECKPOINTS / f"{kind}-epoch{epoch:04d}{suffix}"

    def check_stop(self, epoch):
        """Raise Interrupted if a signal arrived; call after a batch."""
        if self.stop.requested:
            name = signal.Signals(self.stop.signum).name
            done = f"after epoch {self.epochs_done}" if self.epochs_done else "(no epoch completed yet)"
            where = f"during epoch {epoch}" if epoch else "during the final evaluation"
            self.log.info(f"{name} received {where}: stopped after the current batch. "
                          f"The last complete epoch is saved {done}; resume with: "
                          f"python -m {self.args.module} --resume {self.out}")
            raise Interrupted(self.stop.signum, epoch)

    # -- per epoch ---------------------------------------------------------------------
    def end_epoch(self, epoch, train, val, seconds):
        """Record one epoch; returns True when its validation loss is the best so far.

        `train` and `val` are dicts with "loss" and the task's metric.
        """
        for split, values in (("train", train), ("val", val)):
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"the {split} loss became {values['loss']} in epoch {epoch}; training stopped. "
                    f"Lower the learning rate (--lr {self.args.lr:g} now). The best checkpoint so "
                    f"far (epoch {self.best_epoch}) is kept in {self.out / CHECKPOINTS}")
        record = {"epoch": epoch, "seconds": seconds}
        record.update({f"train_{k}": v for k, v in train.items()})
        record.update({f"val_{k}": v for k, v in val.items()})
        self.history.append(record)
        self.train_seconds.append(seconds)
        is_best = val["loss"] < self.best_val_loss
        if is_best:
            self.best_val_loss, self.best_epoch = val["loss"], epoch
        self.log.info(f"epoch {epoch}/{self.args.epochs}: train loss {train['loss']:.4f} "
                      f"{self.metric} {train[self.metric]:.4f} | val loss {val['loss']:.4f} "
                      f"{self.metric} {val[self.metric]:.4f} | {seconds:.1f}s"
                      + (" | best" if is_best else ""))
        return is_best

    def save_state(self, last_checkpoint, best_checkpoint=None):
        """After the framework wrote its checkpoint files, point state.json at them."""
        self.last_checkpoint = Path(last_checkpoint).name
        if best_checkpoint is not None:
            self.best_checkpoint = Path(best_checkpoint).name
        write_json(self.out / CHECKPOINTS / STATE, {
            "history": self.history, "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch, "best_checkpoint": self.best_checkpoint,
            "last_checkpoint": self.last_checkpoint, "train_seconds": self.train_seconds})
        keep = (self.last_checkpoint, self.best_checkpoint)
        for path in (self.out / CHECKPOINTS).iterdir():
            if path.name != STATE and not path.name.startswith(".tmp-") \
                    and not any(k and path.name.startswith(k) for k in keep):
                path.unlink()

    def checkpoint_file(self, name):
        return self.out / CHECKPOINTS / name if name else None

    # -- end of the run ----------------------------------------------------------------
    def items_per_second(self, n_train):
        """Median training throughput over epochs, the first (warm-up) one excluded."""
        seconds = self.train_seconds[1:] or self.train_seconds
        return float(n_train / np.median(seconds)) if seconds else None

    def finish(self, test, outputs, weights, extra=None):
        """Write metrics.json, predictions.csv, curves.png and weights.safetensors."""
        self.check_stop(None)  # a signal during the final evaluation: --resume redoes it
        d = self.dataset
        metrics = {
            "implementation": self.implementation,
            "entry_point": self.args.module,
            "dataset": d.name,
            "task": self.task,
            "device": self.device,
            "test": test,
            "best_epoch": self.best_epoch,
            "epochs": self.history,
            "seconds": time.perf_counter() - self.start_time,
            "items_per_second": self.items_per_second(len(d.x_train)),
            "config": {k: v for k, v in cli.saved_config(self.args).items()},
        }
        metrics.update(extra or {})
        write_json(self.out / "metrics.json", metrics)
        atomic_write_text(self.out / "predictions.csv", predictions_csv(self.task, outputs, d.y_test))
        if self.history:
            plot_curves(self.out / "curves.png", self.history, self.metric)
        save_weights(self.out / "weights.safetensors", weights,
                     weights_metadata(d, self.implementation))
        summary = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
        self.log.info(f"test ({'best epoch ' + str(self.best_epoch) if self.best_epoch else 'given weights'}): "
                      f"{summary}; outputs in {self.out}")
        return metrics
