"""dl-rosetta's benchmarks: measurements, never tests.

Two entry points, each a ``python -m`` module writing a table, a CSV or JSON and
a PNG into ``--out``:

* ``python -m benchmarks.ops``: how a square matrix product and a 3x3 'valid'
  convolution scale with size in pure Python, numpy/scipy, PyTorch, TensorFlow
  (and cupy when installed), on CPU and on a GPU when present;
* ``python -m benchmarks.training``: training throughput (images or rows per
  second) of every implementation of the CNN and the MLP, each in its own
  process, as a ratio against the course manual's PyTorch pipeline measured in
  the same run.

Helpers: ``benchmarks.machine`` (machine and versions), ``benchmarks.timing``
(warm-up, repeats, medians), ``benchmarks.flops`` (analytic model FLOPs),
``benchmarks.data`` (the synthetic benchmark data), ``benchmarks.baselines``
(the course manual's pipelines, reproduced), ``benchmarks.workers`` (the
per-implementation subprocess entry).

Both modules ``import common`` first, which installs the torch/tensorflow
import-order guard, and import torch before tensorflow.
"""
