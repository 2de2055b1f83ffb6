"""Timing done right: warm up, repeat, take the median, wait for the GPU.

``time_call`` times a function the way ``timeit`` would, plus a ``sync``
callable that blocks until queued device work has finished: GPU kernels are
launched asynchronously, so stopping the clock without synchronising measures
the launch, not the work.

``timed_epochs`` times training epochs. In a worker of ``benchmarks.training``
each epoch first waits for its turn (``wait_for_turn``): the coordinator lets
one process compute at a time and hands the turns round, so the epochs of all
implementations interleave and a slow spell of a shared machine falls on all of
them alike instead of on whichever ran through it.
"""
import math
import statistics
import time


def _no_sync():
    return None


def time_call(fn, sync=None, repeats=5, min_repeat_seconds=0.02, budget=None):
    """Seconds per call of `fn()` (a list, one per repeat) and the last result.

    One warm-up call first (allocations, kernel selection, lazy initialisation),
    then a calibration call that picks how many calls each repeat makes so a
    repeat lasts at least `min_repeat_seconds` (timer resolution and Python
    overhead stay negligible). When one call already takes more than `budget`
    seconds the calibration is skipped and only three repeats are made, so the
    slowest size of a sweep costs four calls, not ten.
    """
    sync = sync or _no_sync
    start = time.perf_counter()
    result = fn()
    sync()
    estimate = time.perf_counter() - start
    slow = budget is not None and estimate > budget
    if not slow:
        start = time.perf_counter()
        result = fn()
        sync()
        estimate = time.perf_counter() - start
    number = max(1, math.ceil(min_repeat_seconds / max(estimate, 1e-9)))
    if budget is not None and estimate * repeats > 2 * budget:
        repeats = min(repeats, 3)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            result = fn()
        sync()
        seconds.append((time.perf_counter() - start) / number)
    return seconds, result, number


def median(values):
    return float(statistics.median(values))


def spread(values):
    """(min, max) of the measurements, the honest error bar for a handful of repeats."""
    return float(min(values)), float(max(values))


# -- turns: one process computes at a time (benchmarks.training's schedule) ---------------
_turns = None  # (go lines in, ready lines out) once use_turns() was called


def use_turns(go_in, ready_out):
    """Take turns from now on: `wait_for_turn` writes "ready" to the text stream
    `ready_out` and blocks until a "go" line arrives on `go_in`."""
    global _turns
    _turns = (go_in, ready_out)


def wait_for_turn():
    """Block until the coordinator says this process may compute; at once without turns."""
    if _turns is None:
        return
    go_in, ready_out = _turns
    ready_out.write("ready\n")
    ready_out.flush()
    if go_in.readline().strip() != "go":
        raise SystemExit("benchmarks.training stopped handing out turns")


def timed_epochs(epoch_fn, epochs, before_epoch=None):
    """Seconds of each `epoch_fn(epoch)` for epochs 1..`epochs`; each epoch waits for its
    turn and `before_epoch(epoch)` (reseeding, say) runs, both outside the clock. The
    epoch function must return only once the device has finished its work (a
    ``.item()`` or ``float()`` at its end). What it returns is dropped after the clock
    has stopped: a ``tf.data`` iterator returned there is torn down untimed
    (``benchmarks.baselines`` says why that matters)."""
    seconds = []
    for epoch in range(1, epochs + 1):
        wait_for_turn()
        if before_epoch is not None:
            before_epoch(epoch)
        start = time.perf_counter()
        leftover = epoch_fn(epoch)
        seconds.append(time.perf_counter() - start)
        del leftover
    return seconds
