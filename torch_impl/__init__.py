"""dl-rosetta's PyTorch implementation, the reference the TensorFlow twins mirror.

``models`` (``build_mlp``, ``build_cnn``, shared-format weight export/import),
``train`` (devices, the DataLoader feed, loss, optimizer, one epoch, evaluation,
checkpoints), the entry points ``run_nn``, ``run_cnn`` and ``run_rnn`` (with
``rnn_models``), ``fast`` (the speed variants behind ``--fast``), ``distributed`` (the
process group and collectives of ``torchrun`` runs), and ``scratch`` (a two-layer MLP with hand-written
backward). Twins: ``tf2_impl`` (TensorFlow 2 / Keras 3) and ``tf1_compat`` (TF1-style graphs).
"""
