"""Train the CNN image classifier with Keras's ``model.fit``: ``python -m tf2_impl.run_cnn_keras``.

Twins: ``torch_impl/run_cnn.py`` and ``tf1_compat/run_cnn.py`` (same flags and outputs);
the custom-loop sibling is ``tf2_impl/run_cnn.py``, and the body of ``main`` is
``tf2_impl/runner.py``. Defaults: ``--loop fit --api functional`` (``compile`` / ``fit`` /
``evaluate`` / ``predict`` on a Functional ``keras.Model(inputs, outputs)``). Datasets:
digits (bundled, default), synthetic, cifar10 (``--download``).
"""
from common.runner import run_main
from tf2_impl import runner

MODULE = "tf2_impl.run_cnn_keras"


def main(argv=None):
    runner.main(argv, module=MODULE, kind="image", api="functional", loop="fit",
                description="Train the CNN classifier with Keras 3 (model.fit).")


if __name__ == "__main__":
    run_main(main)
