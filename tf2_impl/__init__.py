"""dl-rosetta's TensorFlow 2 / Keras 3 implementation, twin of ``torch_impl``.

``models`` (the MLP regressor and CNN classifier in the Sequential, Functional and
Subclassing APIs; shared-format weight export/import), ``train`` (``model.fit`` and a
custom ``tf.GradientTape`` loop, devices, checkpoints), ``runner`` (the ``main`` of the
entry points) and the entry points: ``run_nn`` / ``run_cnn`` (custom loop, Subclassing)
and ``run_nn_keras`` / ``run_cnn_keras`` (``model.fit``, Sequential / Functional). Any
entry point runs any combination with ``--api`` and ``--loop``.
Twins: ``torch_impl`` (PyTorch) and ``tf1_compat`` (TF1-style graphs).
Importing the package imports ``common`` first, so the import-order guard is in
place before any module here imports tensorflow.
"""
import common  # noqa: F401  (first: installs the torch/tensorflow import-order guard)
