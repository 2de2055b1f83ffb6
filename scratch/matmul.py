"""The matrix product in C, compiled at run time, in steps that each remove one cause of the
gap to numpy (the course's question: why is a C matrix product 10x slower than BLAS?).

``compiled_matmuls()`` builds ``_SOURCE`` with the machine's compiler (``$CC``, ``cc`` or
``gcc``; ``-O3 -march=native -fopenmp`` where they apply) into one shared library per
element type (float32, float64), cached by a hash of source, compiler and flags under
``$XDG_CACHE_HOME/dl-rosetta`` (or the system temp dir) and renamed into place atomically,
then loads it with ctypes. It returns ``({backend name: matmul(a, b) -> c}, reason)``:
the variants and None, or an empty dict and a one-line reason when nothing can be built.

The steps (``benchmarks.ops`` times each beside numpy):

- ``compiled naive``: the textbook i-j-k loops; the inner loop walks down a column of b,
  a new cache line (and, for large n, a new page) per multiply-add.
- ``compiled loop order``: i-k-j removes the strided walk: the inner loop runs along rows
  of b and c, contiguous, so the compiler can also vectorise it.
- ``compiled blocked``: cache blocking removes the re-reading of all of b from memory for
  every row of a: a 256 x 512 block of b stays in the L2 cache while all rows use it.
- ``compiled vectorised``: packing and a 6 x 2-vector register-blocked micro-kernel remove
  the load and store of c per multiply-add: 12 vector accumulators stay in registers, each
  loaded value of a and b feeds 2 or 6 fused multiply-adds (GCC vector extensions).
- ``compiled threads``: the vectorised product with OpenMP over blocks of rows of a
  removes the idle cores (numpy's BLAS uses them all).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = {"compiled naive": "mm_naive", "compiled loop order": "mm_ikj",
            "compiled blocked": "mm_blocked", "compiled vectorised": "mm_vectorised",
            "compiled threads": "mm_threads"}

# c (n x p) = a (n x m) @ b (m x p), all row-major and contiguous; T is float or double.
_SOURCE = r"""
#include <stdlib.h>
#include <string.h>
#define MIN(x, y) ((x) < (y) ? (x) : (y))
#define V (64 / (int)sizeof(T))            /* lanes in one 64-byte vector */
typedef T vec __attribute__((vector_size(64)));
typedef T uvec __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
enum { MR = 6, NR = 2 * V, KC = 256, MC = 96, NC = 2048, JB = 512 };

/* Step 1: i-j-k, the definition; b is read down a column (stride p) in the inner loop. */
void mm_naive(int n, int m, int p, const T *a, const T *b, T *c) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < p; j++) {
            T s = 0;
            for (int k = 0; k < m; k++) s += a[(size_t)i * m + k] * b[(size_t)k * p + j];
            c[(size_t)i * p + j] = s;
        }
}

/* Step 2: i-k-j; the inner loop is contiguous in b and c (and vectorisable). */
void mm_ikj(int n, int m, int p, const T *restrict a, const T *restrict b, T *restrict c) {
    memset(c, 0, sizeof(T) * n * p);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < m; k++) {
            T aik = a[(size_t)i * m + k];
            for (int j = 0; j < p; j++) c[(size_t)i * p + j] += aik * b[(size_t)k * p + j];
        }
}

/* Step 3: i-k-j on KC x JB blocks of b, each reused from the cache by every row of a. */
void mm_blocked(int n, int m, int p, const T *restrict a, const T *restrict b, T *restrict c) {
    memset(c, 0, sizeof(T) * n * p);
    for (int kk = 0; kk < m; kk += KC)
        for (int jj = 0; jj < p; jj += JB) {
            int ke = MIN(kk + KC, m), je = MIN(jj + JB, p);
            for (int i = 0; i < n; i++)
                for (int k = kk; k < ke; k++) {
                    T aik = a[(size_t)i * m + k];
                    T *restrict ci = c + (size_t)i * p;
                    const T *restrict bk = b + (size_t)k * p;
                    for (int j = jj; j < je; j++) ci[j] += aik * bk[j];
                }
        }
}

/* c[mr x nr] += (MR rows of packed a) x (NR columns of packed b) over kc: MR x 2 vector
   accumulators in registers. */
static void kernel(int kc, const T *restrict a, const T *restrict b, T *restrict c, int ldc,
                   int mr, int nr) {
    vec acc[MR][2];
    memset(acc, 0, sizeof acc);
    for (int k = 0; k < kc; k++, a += MR, b += NR) {
        vec b0 = *(const vec *)b, b1 = *(const vec *)(b + V);
        for (int r = 0; r < MR; r++) { acc[r][0] += a[r] * b0; acc[r][1] += a[r] * b1; }
    }
    if (mr == MR && nr == NR) {
        for (int r = 0; r < MR; r++) {
            *(uvec *)(c + (size_t)r * ldc) += acc[r][0];
            *(uvec *)(c + (size_t)r * ldc + V) += acc[r][1];
        }
        return;
    }
    T t[MR][NR] __attribute__((aligned(64)));
    memcpy(t, acc, sizeof t);
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) c[(size_t)r * ldc + j] += t[r][j];
}

/* Steps 4 and 5: pack b's KC x NC panel in NR-column strips and a's MC x KC block in MR-row
   strips (zero-padded), then the micro-kernel over the strips; threads split a's blocks. */
static void gemm(int n, int m, int p, const T *a, const T *b, T *c, int threads) {
    memset(c, 0, sizeof(T) * n * p);
    T *bp = aligned_alloc(64, sizeof(T) * KC * (NC + NR));
    for (int jc = 0; jc < p; jc += NC) {
        int nc = MIN(NC, p - jc);
        for (int pc = 0; pc < m; pc += KC) {
            int kc = MIN(KC, m - pc);
            for (int jp = 0; jp < nc; jp += NR)
                for (int k = 0; k < kc; k++)
                    for (int j = 0; j < NR; j++)
                        bp[(size_t)jp * kc + k * NR + j] = jp + j < nc ?
                            b[(size_t)(pc + k) * p + jc + jp + j] : 0;
            /* threads only where the work outweighs waking them (square n above about 350) */
            #pragma omp parallel for schedule(dynamic) if(threads && (double)n * kc * nc > 3.2e7)
            for (int ic = 0; ic < n; ic += MC) {
                T ap[MC * KC] __attribute__((aligned(64)));
                int mc = MIN(MC, n - ic);
                for (int ip = 0; ip < mc; ip += MR)
                    for (int k = 0; k < kc; k++)
                        for (int r = 0; r < MR; r++)
                            ap[ip * kc + k * MR + r] = ip + r < mc ?
                                a[(size_t)(ic + ip + r) * m + pc + k] : 0;
                for (int jr = 0; jr < nc; jr += NR)
                    for (int ir = 0; ir < mc; ir += MR)
                        kernel(kc, ap + ir * kc, bp + (size_t)jr * kc,
                               c + (size_t)(ic + ir) * p + jc + jr, p,
                               MIN(MR, mc - ir), MIN(NR, nc - jr));
            }
        }
    }
    free(bp);
}

void mm_vectorised(int n, int m, int p, const T *a, const T *b, T *c) {
    gemm(n, m, p, a, b, c, 0);
}
void mm_threads(int n, int m, int p, const T *a, const T *b, T *c) {
    gemm(n, m, p, a, b, c, 1);
}
"""

_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


def _cache_dir():
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dl-rosetta"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else 0
    base = Path(tempfile.gettempdir()) / f"dl-rosetta-{user}"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _compile(cc, flags, ctype):
    """The cached library for one element type, built (atomically) if it is not there yet."""
    key = hashlib.sha256("\0".join([_SOURCE, cc, ctype, *flags]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"matmul-{ctype}-{key}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            src = Path(tmp).with_suffix(".c")
            src.write_text(_SOURCE)
            subprocess.run([cc, *flags, "-std=gnu11", "-shared", "-fPIC", f"-DT={ctype}",
                            str(src), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            for leftover in (tmp, str(src)):
                if os.path.exists(leftover):
                    os.remove(leftover)
    return ctypes.CDLL(str(lib))


def _wrap(libs, symbol):
    def matmul(a, b):
        dtype = np.float32 if a.dtype == b.dtype == np.float32 else np.float64
        a, b = (np.ascontiguousarray(x, dtype) for x in (a, b))
        (n, m), (m2, p) = a.shape, b.shape
        if m != m2:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match")
        c = np.empty((n, p), dtype)
        if c.size:
            getattr(libs[dtype], symbol)(n, m, p, a.ctypes.data, b.ctypes.data, c.ctypes.data)
        return c
    matmul.__name__ = symbol
    return matmul


_BUILT = None


def compiled_matmuls():
    """({backend name: matmul(a, b) -> c}, None), or ({}, one-line reason) without a compiler.
    float32 inputs are multiplied in float32, anything else in float64."""
    global _BUILT
    if _BUILT is not None:
        return _BUILT
    cc = next(filter(None, (shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc") if c)),
              None)
    if cc is None:
        _BUILT = {}, "no C compiler found (cc or gcc on PATH, or $CC): compiled matmul skipped"
        return _BUILT
    error = None
    for flags in _FLAGS:
        try:
            libs = {np.float32: _compile(cc, flags, "float"),
                    np.float64: _compile(cc, flags, "double")}
        except (OSError, subprocess.SubprocessError) as exc:
            error = getattr(exc, "stderr", b"") or str(exc).encode()
            continue
        for lib in libs.values():
            for symbol in VARIANTS.values():
                getattr(lib, symbol).argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
        names = [k for k in VARIANTS if k != "compiled threads" or "-fopenmp" in flags]
        _BUILT = {k: _wrap(libs, VARIANTS[k]) for k in names}, None
        return _BUILT
    last = error.decode(errors="replace").strip().splitlines()[-1:] if error else ["?"]
    _BUILT = {}, f"{cc} failed to build the compiled matmul: {last[0]}"
    return _BUILT
