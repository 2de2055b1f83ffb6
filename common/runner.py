"""The bookkeeping every ``run_*`` entry point shares, framework-free.

``run_main(main)`` turns errors into exit codes: 2 with one sentence for bad
input, 3 for a non-finite loss, 130/143 after SIGINT/SIGTERM. ``TrainingRun`` is
the one hook a training loop calls, so that the loop itself reads like the
library's own examples::

    run = TrainingRun(args, "torch", dataset, device, save=..., load=..., reseed=...)
    for epoch in run.epochs():          # re-seeds dropout, starts the epoch clock
        train = train_one_epoch(...)
        val, _ = evaluate(...)
        run.end_epoch(epoch, train, val)  # log line, NaN check, checkpoint, state.json
    run.load_best()
    run.finish(test, outputs, weights)  # metrics.json, predictions.csv, curves, weights

Model, optimizer and checkpoint files stay in each implementation, in its own
idiom: the run is handed ``save(path)`` and ``load(path)`` and calls them.

Resuming works at epoch boundaries: after every epoch the run saves a checkpoint,
then ``state.json`` naming it. SIGINT/SIGTERM stop training at once (the epoch in
progress is abandoned); while a checkpoint or the outputs are being written the
signal waits for the write to end. ``--resume`` restarts the abandoned epoch from
the last saved one. Batch order and dropout seeds are functions of (seed, epoch)
(``common.datasets.batch_indices``, ``common.seed.epoch_seed``), so the resumed
run computes exactly what the uninterrupted one did.
"""
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from common import cli, recipes
from common.distributed import SINGLE
from common.errors import Interrupted, NonFiniteLossError, UserError
from common.frameworks import tf32_in_use
from common.outputs import (atomic_write_text, plot_curves, predictions_csv, setup_logger,
                            write_json)
from common.seed import epoch_seed
from common.signals import StopSignal
from common.weights import model_options, save_weights, weights_metadata

STATE = "state.json"
CHECKPOINTS = "checkpoint"


def run_main(main, argv=None):
    """Call ``main(argv)`` and exit the way the command line promises."""
    try:
        main(argv)
        late = StopSignal.active.pending if StopSignal.active else None
        if late is not None:
            # The signal came while the outputs were written: they are complete, but
            # the shell still learns that the run was interrupted.
            print(f"{signal.Signals(late).name} received while finishing; the outputs were "
                  f"written completely", file=sys.stderr)
            sys.exit(128 + late)
    except (UserError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if StopSignal.active is not None:
            StopSignal.active.uninstall()


class TrainingRun:
    """One run's output directory, history, checkpoints and resumable state."""

    def __init__(self, args, implementation, dataset, device, save, load, reseed=None,
                 details=None, lr=None, world=SINGLE):
        self.args, self.implementation, self.dataset, self.device = args, implementation, dataset, device
        self.save, self.load, self.reseed = save, load, reseed
        self.lr = lr  # () -> the optimizer's learning rate now, recorded at each epoch's start
        self.details = {**(details or {}), **world.details()}
        # Data-parallel: the chief writes everything; the other processes keep the same
        # history (the same epochs, early stop and plateau) but write nothing.
        self.world = world
        self.out = Path(args.out)
        if world.is_chief:
            (self.out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        self.log = setup_logger(self.out if world.is_chief else None, args.module)
        self.task = dataset.task
        self.metric = "accuracy" if self.task == "classification" else "mse"
        self.history, self.epoch_seconds = [], []
        self.best_val_loss, self.best_epoch = math.inf, 0
        self.best_checkpoint = self.last_checkpoint = None
        self.epoch = None
        self.start_time = time.perf_counter()
        # Several processes: a signal waits for the end of a training batch, where every
        # process stops together (one stopping alone would leave the others in an all-reduce).
        self.stop = StopSignal(self._stop_message, hold=world.multi_process)
        self.stop.install()
        if args.resume:
            self._resume()
        elif world.is_chief:
            write_json(self.out / cli.RUN_CONFIG, cli.saved_config(args))
        if dataset.extra.get("note"):
            self.log.info(dataset.extra["note"])
        variant = "fast" if getattr(args, "fast", False) else "plain"
        self.log.info(f"{args.module} ({variant}): {dataset.name} ({dataset.source}), "
                      f"train/val/test {len(dataset.x_train)}/{len(dataset.x_val)}/"
                      f"{len(dataset.x_test)}, device {device}, output {self.out}")

    def _resume(self):
        path = self.out / CHECKPOINTS / STATE
        if not path.is_file():
            # Stopped before its first epoch ended: nothing was saved, and since every
            # run is seeded, starting over is what the uninterrupted run did.
            self.log.info(f"{self.out} stopped before its first epoch ended: starting it "
                          f"again from epoch 1")
            return
        state = json.loads(path.read_text())
        self.history, self.epoch_seconds = state["history"], state["epoch_seconds"]
        self.best_val_loss, self.best_epoch = state["best_val_loss"], state["best_epoch"]
        self.best_checkpoint, self.last_checkpoint = state["best_checkpoint"], state["last_checkpoint"]
        self.load(self.out / CHECKPOINTS / self.last_checkpoint)
        self.log.info(f"resuming {self.out} after epoch {self.initial_epoch}")

    def _stop_message(self, signum):
        name = signal.Signals(signum).name
        where = f"during epoch {self.epoch}" if self.epoch else "outside the training epochs"
        done = f"after epoch {self.initial_epoch}" if self.history else "(no epoch completed yet)"
        message = (f"{name} received {where}: stopped. The last complete epoch is saved {done}; "
                   f"resume with: python -m {self.args.module} --resume {self.out}")
        self.log.info(message)
        return message

    # -- the epoch loop ------------------------------------------------------------------
    @property
    def initial_epoch(self):
        """Epochs already trained (Keras's ``initial_epoch``)."""
        return len(self.history)

    @property
    def final_epoch(self):
        """The epoch training ends after (Keras's ``epochs``); no training with --eval-only or
        once --early-stop has ended the run."""
        stopped = self.args.eval_only or self.should_stop  # --early-stop ended it already
        return self.initial_epoch if stopped else self.args.epochs

    def epochs(self):
        """The epochs still to train (1-based), each started with ``start_epoch``; fewer when
        ``--early-stop`` ends the run."""
        for epoch in range(self.initial_epoch + 1, self.final_epoch + 1):
            if self.should_stop:
                break
            self.start_epoch(epoch)
            yield epoch
        self.epoch = None

    @property
    def should_stop(self):
        """True once --early-stop's patience has run out (Keras's ``fit`` callback reads it)."""
        return bool(self.history) and recipes.early_stop_due(self.args, self.initial_epoch,
                                                             self.best_epoch)

    def val_losses(self):
        """The validation losses so far: the plateau rule's input, kept across --resume."""
        return [entry["val_loss"] for entry in self.history]

    def start_epoch(self, epoch):
        """Re-seed the framework's dropout for this epoch and start its clock."""
        self.epoch = epoch
        if self.reseed is not None:
            self.reseed(epoch_seed(self.args.seed, epoch))
        self._epoch_lr = recipes.recorded_lr(self.lr()) if self.lr is not None else None
        self._epoch_start = time.perf_counter()

    def end_epoch(self, epoch, train, val):
        """Record one epoch and checkpoint it; True when its validation loss is the best.

        `train` and `val` are dicts with "loss" and the task's metric.
        """
        seconds = time.perf_counter() - self._epoch_start
        for split, values in (("train", train), ("val", val)):
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"the {split} loss became {values['loss']} in epoch {epoch}; training stopped. "
                    f"Lower the learning rate (--lr {self.args.lr:g} now). The best checkpoint so "
                    f"far (epoch {self.best_epoch}) is kept in {self.out / CHECKPOINTS}")
        lr = {} if self._epoch_lr is None else {"lr": self._epoch_lr}
        self.history.append({"epoch": epoch, "seconds": seconds, **lr,
                             **{f"train_{k}": v for k, v in train.items()},
                             **{f"val_{k}": v for k, v in val.items()}})
        self.epoch_seconds.append(seconds)
        is_best = val["loss"] < self.best_val_loss
        if is_best:
            self.best_val_loss, self.best_epoch = val["loss"], epoch
        self.log.info(f"epoch {epoch}/{self.args.epochs}: train loss {train['loss']:.4f} "
                      f"{self.metric} {train[self.metric]:.4f} | val loss {val['loss']:.4f} "
                      f"{self.metric} {val[self.metric]:.4f} | "
                      + ("" if self._epoch_lr is None else f"lr {self._epoch_lr:.3g} | ")
                      + f"{seconds:.1f}s" + (" | best" if is_best else ""))
        if self.world.is_chief:
            with self.stop.deferred():
                self._checkpoint(epoch, is_best)
        if self.should_stop and epoch < self.args.epochs:
            self.log.info(f"early stop after epoch {epoch}: no better validation loss for "
                          f"{epoch - self.best_epoch} epochs (--early-stop "
                          f"{self.args.early_stop}); the best epoch is {self.best_epoch}")
        return is_best

    def _checkpoint(self, epoch, is_best):
        """save() this epoch, point state.json at it, delete what it replaced."""
        name = f"epoch{epoch:04d}"
        self.save(self.out / CHECKPOINTS / name)
        self.last_checkpoint = name
        if is_best:
            self.best_checkpoint = name
        write_json(self.out / CHECKPOINTS / STATE, {
            "history": self.history, "epoch_seconds": self.epoch_seconds,
            "best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch,
            "best_checkpoint": self.best_checkpoint, "last_checkpoint": self.last_checkpoint})
        keep = {self.last_checkpoint, self.best_checkpoint}
        for path in (self.out / CHECKPOINTS).iterdir():
            if path.name != STATE and not path.name.startswith(".tmp-") \
                    and path.name.split(".")[0] not in keep:
                path.unlink()

    def until_stopped(self, batches, any_rank):
        """The training `batches` of a multi-process run, stopping every process at the
        same batch after a signal (``StopSignal.until_stopped``)."""
        return self.stop.until_stopped(batches, any_rank)

    def load_best(self):
        """Load the checkpoint of the epoch with the lowest validation loss, if any (the
        chief only: the others end after training)."""
        self.epoch = None
        if self.best_checkpoint and self.world.is_chief:
            self.load(self.out / CHECKPOINTS / self.best_checkpoint)

    # -- end of the run ------------------------------------------------------------------
    def items_per_second(self):
        """Median training throughput over epochs, the first (warm-up) one excluded."""
        seconds = self.epoch_seconds[1:] or self.epoch_seconds
        return float(len(self.dataset.x_train) / np.median(seconds)) if seconds else None

    def finish(self, test, outputs, weights):
        """Write metrics.json, predictions.csv, curves.png and weights.safetensors (the
        chief; None elsewhere)."""
        if not self.world.is_chief:
            return None
        d = self.dataset
        metrics = {
            "implementation": self.implementation, "entry_point": self.args.module,
            "variant": "fast" if getattr(self.args, "fast", False) else "plain",
            **self.details,
            "dataset": d.name, "task": self.task, "device": self.device,
            "tf32": tf32_in_use(self.implementation, self.device), "test": test,
            "best_epoch": self.best_epoch, "epochs": self.history,
            "seconds": time.perf_counter() - self.start_time,
            "items_per_second": self.items_per_second(),
            "config": cli.saved_config(self.args),
        }
        with self.stop.deferred(then_stop=False):  # run_main reports a signal that came now
            write_json(self.out / "metrics.json", metrics)
            atomic_write_text(self.out / "predictions.csv", predictions_csv(self.task, outputs, d.y_test))
            if self.history:
                plot_curves(self.out / "curves.png", self.history, self.metric)
            save_weights(self.out / "weights.safetensors", weights,
                         weights_metadata(d, self.implementation, model_options(self.args)))
        summary = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
        given = f"best epoch {self.best_epoch}" if self.best_epoch else "given weights"
        self.log.info(f"test ({given}): {summary}; outputs in {self.out}")
        return metrics
