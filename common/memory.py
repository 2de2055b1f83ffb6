"""Keep freed memory in the process: glibc malloc settings for training loops.

A CNN training step on the CPU allocates and frees the same large buffers every
batch: one 100 x 32 x 32 x 32 float32 activation is 13 MB. glibc's malloc serves
big blocks with ``mmap`` and gives them back to the kernel on ``free``, and trims
the top of its heap whenever that holds more free memory than a threshold; the
next step faults the pages back in, and the kernel zeroes each one. On this
project's 2-core machine that made a third of PyTorch's training time system
time, and training ran at half speed (measured with ``vmstat``: 35% ``sy``
before, 1-2% after).

``keep_freed_memory()`` raises both thresholds so freed buffers stay in the
process and the next step reuses them. It is what the environment variables
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` do at
start-up, or preloading jemalloc or tcmalloc (PyTorch's CPU performance guide):
set from Python, it needs no wrapper script. The cost is that the process keeps
its peak heap until it exits. TensorFlow's runners do not call it: their
training speed did not change with it.
"""
import ctypes
import sys

# mallopt() parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 2**30


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds; True when glibc accepted both.

    A no-op returning False elsewhere (macOS, Windows, musl's stub ``mallopt``).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded in this process
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Fixing the mmap threshold also switches off glibc's own adjustment of it.
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
