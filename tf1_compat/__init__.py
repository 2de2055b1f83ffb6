"""TF1-style graph code through ``tf.compat.v1``: define the graph, then run it in a Session.

The twin of ``torch_impl`` (PyTorch) and ``tf2_impl`` (TensorFlow 2 / Keras 3),
with the same module and function names: ``models`` (graph-building functions
``build_mlp`` and ``build_cnn`` returning a ``GraphModel``, and the shared weights
conversion), ``train`` (``make_loss``, ``make_optimizer``, ``train_one_epoch``,
``evaluate``, ``predict`` over a Session with ``feed_dict``), ``fast`` (the speed
variants of ``--fast``), ``distributed`` (the in-graph towers of ``--replicas``),
``run_nn``, ``run_cnn`` and ``run_rnn`` (entry points, with ``rnn_models``), and
``session_basics`` (define-and-run next to eager TF2 and PyTorch autograd).

Every graph is built inside its own ``tf.Graph()``, so this package also works in
a process that runs TF2 eager code; only the ``python -m`` entry points call
``tf.compat.v1.disable_v2_behavior()``. Importing the package imports ``common``
first, so the import-order guard is in place before any module here imports
tensorflow.
"""
import common  # noqa: F401  (first: installs the torch/tensorflow import-order guard)
