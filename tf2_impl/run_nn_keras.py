"""Train the MLP regressor with Keras's ``model.fit``: ``python -m tf2_impl.run_nn_keras``.

Twins: ``torch_impl/run_nn.py`` and ``tf1_compat/run_nn.py`` (same flags and outputs);
the custom-loop sibling is ``tf2_impl/run_nn.py``, and the body of ``main`` is
``tf2_impl/runner.py``. Defaults: ``--loop fit --api sequential`` (``compile`` / ``fit`` /
``evaluate`` / ``predict`` on a ``keras.Sequential``). Datasets: friedman (generated,
default), diabetes (bundled), california (``--download``).
"""
from common.runner import run_main
from tf2_impl import runner

MODULE = "tf2_impl.run_nn_keras"


def main(argv=None):
    runner.main(argv, module=MODULE, kind="tabular", api="sequential", loop="fit",
                description="Train the MLP regressor with Keras 3 (model.fit).")


if __name__ == "__main__":
    run_main(main)
