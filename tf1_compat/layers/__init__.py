"""TF1-style versions of the layer rosetta's layers: ``get_variable`` plus ``tf.nn`` ops in
a ``variable_scope`` per layer, recurrences with ``tf.scan``, built inside a ``tf.Graph()``
(``tf.compat.v1.layers`` and ``tf.compat.v1.nn.rnn_cell`` are gone under Keras 3). Variables
are named and laid out as the Keras twin's (``scope/kernel``, ``scope/bias``, ...), so one
converter in ``common.converters`` serves both."""
