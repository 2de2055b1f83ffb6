"""SIGINT/SIGTERM during training: stop at once, after a file write, or, when several
processes train together, at the same batch in all of them.

``common.runner.TrainingRun`` installs a ``StopSignal``; ``common.runner.run_main`` turns
the ``Interrupted`` it raises into exit code 130 (SIGINT) or 143 (SIGTERM).
"""
import contextlib
import signal

from common.errors import Interrupted


class StopSignal:
    """SIGINT/SIGTERM handlers that raise ``Interrupted``, at once or after a write; with
    `hold` (one of several processes training together) only at a batch's end, in
    ``until_stopped``, where all the processes stop together."""

    active = None  # the instance whose handlers are installed, for run_main

    def __init__(self, describe, hold=False):
        self.describe = describe  # signum -> the sentence logged before stopping
        self.hold = hold
        self.pending = None
        self._deferring = False
        self._previous = {}

    def install(self):
        if StopSignal.active is not None:
            StopSignal.active.uninstall()
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        StopSignal.active = self

    def uninstall(self):
        """Give the signals back to whoever handled them before (pytest, a caller)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if StopSignal.active is self:
            StopSignal.active = None

    def _handle(self, signum, frame):
        if self._deferring or self.hold:
            self.pending = signum
            return
        raise Interrupted(signum, self.describe(signum))

    @contextlib.contextmanager
    def deferred(self, then_stop=True):
        """Hold signals while the block writes files; stop after it when `then_stop` (and
        not `hold`: then the next batch's end stops every process)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.pending is not None and then_stop and not self.hold:
            raise Interrupted(self.pending, self.describe(self.pending))

    def until_stopped(self, batches, any_rank):
        """Yield `batches`, holding signals until each batch's end; then stop together.

        Processes training together (torch DDP ranks, multi-worker TF) meet in an
        all-reduce at every step. One that stopped on its own would leave the others
        waiting there, so a signal only marks the batch, and after it
        ``any_rank(got_one)`` (an all-reduce of the flag) tells every process whether
        any of them got one: then all raise ``Interrupted`` at the same batch.
        """
        with self.deferred(then_stop=False):
            for batch in batches:
                yield batch
                if any_rank(self.pending is not None):
                    break
            else:
                return
        signum = self.pending or signal.SIGTERM  # another process got it
        raise Interrupted(signum, self.describe(signum))
