"""Train the MLP regressor with a custom tf.GradientTape loop: ``python -m tf2_impl.run_nn``.

Twins: ``torch_impl/run_nn.py`` and ``tf1_compat/run_nn.py`` (same flags and outputs);
the ``model.fit`` sibling is ``tf2_impl/run_nn_keras.py``, the CNN sibling
``tf2_impl/run_cnn.py``, and the body of ``main`` is ``tf2_impl/runner.py``. Defaults:
``--loop tape --api subclassing`` (``models.MLPRegressor``, the API closest to torch).
Datasets: friedman (generated, default), diabetes (bundled), california (``--download``).
"""
from common.runner import run_main
from tf2_impl import runner

MODULE = "tf2_impl.run_nn"


def main(argv=None):
    runner.main(argv, module=MODULE, kind="tabular", api="subclassing", loop="tape",
                description="Train the MLP regressor with TensorFlow 2 (GradientTape loop).")


if __name__ == "__main__":
    run_main(main)
