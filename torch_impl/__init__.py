"""dl-rosetta's PyTorch implementation, the reference the TensorFlow twins mirror.

``models`` (MLP regressor, CNN classifier, shared-format weight export/import),
``train`` (one epoch, evaluation, devices), the entry points ``run_nn`` and
``run_cnn``, and ``scratch`` (a two-layer MLP with hand-written backward).
Twins: ``tf2_impl`` (TensorFlow 2 / Keras 3) and ``tf1_compat`` (TF1-style graphs).
"""
