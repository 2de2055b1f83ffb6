"""dl-rosetta's TensorFlow 2 / Keras 3 implementation, twin of ``torch_impl``.

``models`` (the MLP regressor and CNN classifier from stock Keras layers in the Sequential,
Functional and Subclassing APIs; shared-format weight export/import), ``train`` (a custom
``tf.GradientTape`` loop over ``tf.data`` and the ``model.fit`` feed and callback; devices,
checkpoints), ``fast`` (the ``--fast`` speed variants), ``distributed`` (the
``tf.distribute`` strategies of ``--replicas`` and multi-worker runs) and the entry points:
``run_nn`` / ``run_cnn`` / ``run_rnn`` (GradientTape loop, Subclassing) and
``run_nn_keras`` / ``run_cnn_keras`` / ``run_rnn_keras`` (``model.fit``, Sequential /
Functional). Any entry point runs any combination with
``--api`` and ``--loop``.
Twins: ``torch_impl`` (PyTorch) and ``tf1_compat`` (TF1-style graphs).
Importing the package imports ``common`` first, so the import-order guard is in
place before any module here imports tensorflow.
"""
import common  # noqa: F401  (first: installs the torch/tensorflow import-order guard)
