"""Train the CNN classifier with a custom tf.GradientTape loop: ``python -m tf2_impl.run_cnn``.

Twins: ``torch_impl/run_cnn.py`` and ``tf1_compat/run_cnn.py`` (same flags and outputs);
the ``model.fit`` sibling is ``tf2_impl/run_cnn_keras.py``, the MLP sibling
``tf2_impl/run_nn.py``, and the body of ``main`` is ``tf2_impl/runner.py``. Defaults:
``--loop tape --api subclassing`` (``models.CNNClassifier``, the API closest to torch).
Datasets: digits (bundled, default), synthetic, cifar10 (``--download``).
"""
from common.runner import run_main
from tf2_impl import runner

MODULE = "tf2_impl.run_cnn"


def main(argv=None):
    runner.main(argv, module=MODULE, kind="image", api="subclassing", loop="tape",
                description="Train the CNN classifier with TensorFlow 2 (GradientTape loop).")


if __name__ == "__main__":
    run_main(main)
