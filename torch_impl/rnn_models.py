"""The recurrent sequence classifier as a PyTorch module.

Twins: ``tf2_impl/rnn_models.py`` (Keras ``layers.LSTM``/``layers.GRU``) and
``tf1_compat/rnn_models.py`` (the cell equations with ``get_variable`` and
``tf.scan``). Sizes come from ``common.config`` (``RNN_HIDDEN``, ``RNN_LAYERS``).
The shared weights format is this module's ``state_dict``: ``rnn.weight_ih_l0``
(gates*hidden, features), ``rnn.weight_hh_l0``, ``rnn.bias_ih_l0``,
``rnn.bias_hh_l0`` (``_reverse`` for the backward direction), ``fc.weight``,
``fc.bias``; the TF twins convert through ``common.converters.recurrent``.
"""
import torch
from torch import nn

from common import config
from torch_impl.models import export_weights, import_weights  # the state_dict: any model

__all__ = ["RNNClassifier", "build_rnn", "export_weights", "import_weights"]

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RNNClassifier(nn.Module):
    """(N, T, F) sequences -> rnn (LSTM or GRU) -> final hidden state -> fc -> logits.

    The final hidden state is the last layer's ``h_n``: the forward direction's after
    the last step (equal to the output at the last step) and, when bidirectional, the
    backward direction's after the first step, concatenated [forward, backward], which
    is what Keras's ``Bidirectional(LSTM(...))`` returns.
    """

    def __init__(self, num_features, num_classes, cell="lstm", bidirectional=False):
        super().__init__()
        self.directions = 2 if bidirectional else 1
        # batch_first=True: the input is (N, T, F). With torch's default batch_first=False
        # the layer reads (T, N, F), and a (N, T, F) batch runs without an error, taking
        # the samples for time steps and the time steps for samples.
        self.rnn = CELLS[cell](num_features, config.RNN_HIDDEN, num_layers=config.RNN_LAYERS,
                               batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(config.RNN_HIDDEN * self.directions, num_classes)

    def forward(self, x):  # x: (N, T, F)
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n); GRU: h_n
        # h_n: (layers * directions, N, hidden); the last layer's rows come last.
        x = torch.cat(tuple(h_n[-self.directions:]), dim=1)
        return self.fc(x)  # logits: nn.CrossEntropyLoss applies log-softmax itself


def build_rnn(num_features, num_classes, cell="lstm", bidirectional=False):
    """The recurrent classifier for sequences of `num_features` features per step."""
    return RNNClassifier(num_features, num_classes, cell, bidirectional)
