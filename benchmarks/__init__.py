"""dl-rosetta's benchmarks: measurements, never tests.

* ``python -m benchmarks.training``: training throughput of every entry point, plain and
  ``--fast``, against the course manual's pipelines (``baselines``), each in its own process;
* ``python -m benchmarks.ops``: how a matrix product and a 3x3 convolution scale with size in
  pure Python, numpy, compiled C (``scratch.matmul``), PyTorch, TensorFlow and cupy.
"""
