"""The course manual's training pipelines, reproduced as the benchmark's yardsticks.

Each function trains for `epochs` epochs and returns the seconds of each one;
``benchmarks.workers`` drops the warm-up epochs and reports the rest. They are
written the way the manual (and the frameworks' own tutorials) wrote them, on
purpose: they are what the implementations are measured against, so they must
not be made slower -- nor faster -- than that.

* ``manual_torch_cnn`` -- THE baseline: a ``Dataset`` that, like torchvision's
  ``CIFAR10``, turns one uint8 array into a PIL image per sample and applies
  ``transforms.Compose([ToTensor(), Normalize(mean, std)])``; a ``DataLoader``
  with batch 100, ``shuffle=True`` and the default ``num_workers=0``; the
  shared CNN's layers with the manual's conv -> batch norm -> ReLU -> pool
  order (``ManualCNN``; the shipped model pools first, the same function);
  ``nn.CrossEntropyLoss``, ``optim.Adam`` and ``running_loss += loss.item()``
  after every batch.
* ``manual_torch_mlp`` -- the MLP baseline: ``DataLoader(TensorDataset(x, y))``,
  batch 100, shuffled, the shared ``MLPRegressor``, ``nn.MSELoss``.
* ``manual_tf2_loop`` and ``manual_keras_tfdata`` -- the manual's TF2 versions:
  a Keras ``Sequential`` model with softmax as its last layer and Keras
  defaults elsewhere, trained on ``tf.data.Dataset.from_tensor_slices(...)
  .shuffle(n).batch(100)`` either by a ``@tf.function`` ``GradientTape`` step or
  by ``model.fit`` (one call per epoch, see ``manual_keras_tfdata``).
* ``manual_tf_graph`` -- a straightforward TF1 graph: placeholders,
  ``get_variable``, ``tf.nn`` ops, ``AdamOptimizer().minimize``, and
  ``sess.run`` with a ``feed_dict`` of numpy slices per batch.

The manual's TF2 versions tear each epoch's ``tf.data`` iterator down after the
clock stops. In TF 2.21, deleting an iterator sometimes waits for its autotuning
thread (``Model::OptimizeLoop``) to wake up, which it does 10 x (2**k - 1) ms after
the iterator started, at most a minute apart: measured, about one teardown in four
waited, for up to as long as the iterator had lived. Timed, that turned 2.6 s
epochs into 5.1 s ones at random, and in ``fit(epochs=...)``, whose iterator
lives on through the other processes' turns until the next epoch begins, into
12-31 s ones. The implementations' timings leave it out too: their ``fit``
reads one iterator across all epochs, their loops use none.

Frameworks are imported inside the functions: a worker process imports only
the framework its entry needs.
"""
import time

import numpy as np

from common import config
from benchmarks.timing import timed_epochs, wait_for_turn

BATCH_SIZE = config.BATCH_SIZE
LEARNING_RATE = config.LEARNING_RATE


# -- PyTorch, the baselines --------------------------------------------------------------
def _torch_loop(model, loader, criterion, device, epochs):
    import torch
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def epoch_fn(epoch):
        model.train()
        running_loss = 0.0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        return running_loss / len(loader)

    return timed_epochs(epoch_fn, epochs)


def _manual_cnn_class():
    import torch.nn.functional as F

    from torch_impl.models import CNNClassifier

    class ManualCNN(CNNClassifier):
        """The shared CNN with the manual's block order, ReLU before the pooling."""

        def forward(self, x):
            x = self.pool(F.relu(self.bn1(self.conv1(x))))
            x = self.pool(F.relu(self.bn2(self.conv2(x))))
            x = self.pool(F.relu(self.bn3(self.conv3(x))))
            x = self.dropout(F.relu(self.fc1(self.flatten(x))))
            return self.fc3(F.relu(self.fc2(x)))

    return ManualCNN


def manual_torch_cnn(data, device, epochs):
    import torch
    from PIL import Image
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class PILImages(Dataset):
        """What torchvision.datasets.CIFAR10 does per item: uint8 HWC -> PIL -> transform."""

        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            image = Image.fromarray(self.images[index])
            return self.transform(image), int(self.labels[index])

    torch.manual_seed(config.SEED)
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(data.mean.tolist(), data.std.tolist()),
    ])
    loader = DataLoader(PILImages(data.images, data.labels, transform),
                        batch_size=BATCH_SIZE, shuffle=True)
    device = torch.device(device)
    model = _manual_cnn_class()(data.input_shape, data.num_classes).to(device)
    return _torch_loop(model, loader, nn.CrossEntropyLoss(), device, epochs)


def manual_torch_mlp(data, device, epochs):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from torch_impl.models import MLPRegressor

    torch.manual_seed(config.SEED)
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y).reshape(-1, 1))
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    device = torch.device(device)
    model = MLPRegressor(data.input_shape[-1]).to(device)
    return _torch_loop(model, loader, nn.MSELoss(), device, epochs)


# -- TensorFlow 2, the manual's reference records -----------------------------------------
def _keras_cnn(input_shape, num_classes):
    from tensorflow import keras
    from tensorflow.keras import layers
    model = keras.Sequential([keras.Input(shape=input_shape)])
    for filters in config.CNN_FILTERS:
        model.add(layers.Conv2D(filters, config.CNN_KERNEL, padding="same"))
        model.add(layers.BatchNormalization())
        model.add(layers.Activation("relu"))
        model.add(layers.MaxPooling2D(config.CNN_POOL))
    model.add(layers.Flatten())
    model.add(layers.Dense(config.CNN_FC[0], activation="relu"))
    model.add(layers.Dropout(config.DROPOUT))
    model.add(layers.Dense(config.CNN_FC[1], activation="relu"))
    model.add(layers.Dense(num_classes, activation="softmax"))
    return model


def _keras_mlp(num_features):
    from tensorflow import keras
    from tensorflow.keras import layers
    model = keras.Sequential([keras.Input(shape=(num_features,))])
    for units in config.MLP_HIDDEN:
        model.add(layers.Dense(units, activation="relu"))
    model.add(layers.Dense(1))
    return model


def _tf_dataset(x, y):
    import tensorflow as tf
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x)).batch(BATCH_SIZE)


def _manual_model_and_loss(task, data):
    from tensorflow import keras
    if task == "cnn":
        return (_keras_cnn(data.input_shape, data.num_classes),
                keras.losses.SparseCategoricalCrossentropy(), data.x, data.labels)
    return _keras_mlp(data.input_shape[-1]), keras.losses.MeanSquaredError(), data.x, data.y.reshape(-1, 1)


def manual_tf2_loop(task, data, epochs):
    import tensorflow as tf
    from tensorflow import keras
    tf.random.set_seed(config.SEED)
    model, loss_fn, x, y = _manual_model_and_loss(task, data)
    optimizer = keras.optimizers.Adam(learning_rate=LEARNING_RATE)
    dataset = _tf_dataset(x, y)

    @tf.function
    def train_step(inputs, targets):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            loss = loss_fn(targets, outputs)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def epoch_fn(epoch):
        total = 0.0
        batches = iter(dataset)  # what `for ... in dataset` does, kept to tear down untimed
        for inputs, targets in batches:
            total += train_step(inputs, targets)  # a tensor: no host round trip per step
        float(total)  # waits for the last step
        return batches  # timed_epochs drops it after stopping the clock

    return timed_epochs(epoch_fn, epochs)


def manual_keras_tfdata(task, data, epochs):
    import tensorflow as tf
    from tensorflow import keras
    tf.random.set_seed(config.SEED)
    model, loss_fn, x, y = _manual_model_and_loss(task, data)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE), loss=loss_fn,
                  metrics=["accuracy"] if task == "cnn" else [])
    dataset = _tf_dataset(x, y)
    timer = EpochTimer()
    # One fit call per epoch, where the manual has fit(epochs=epochs): the same training,
    # but each epoch's iterator is torn down (untimed) as its fit returns, not after the
    # other processes' turns (see the module docstring).
    for _ in range(epochs):
        model.fit(dataset, epochs=1, callbacks=[timer.callback()])
    return timer.seconds


class EpochTimer:
    """Seconds per epoch of ``model.fit`` calls, from the start of an epoch (after its
    turn) to the end of its last batch."""

    def __init__(self):
        self.seconds = []
        self._start = None

    def callback(self):
        from tensorflow import keras
        timer = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                wait_for_turn()
                timer._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timer.seconds.append(time.perf_counter() - timer._start)

        return _Callback()


# -- TF1 graph, the manual's reference record ---------------------------------------------
def manual_tf_graph(task, data, epochs):
    import tensorflow as tf
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(config.SEED)
        glorot = v1.glorot_uniform_initializer
        if task == "cnn":
            x = v1.placeholder(tf.float32, [None, *data.input_shape])
            y = v1.placeholder(tf.int64, [None])
        else:
            x = v1.placeholder(tf.float32, [None, data.input_shape[-1]])
            y = v1.placeholder(tf.float32, [None, 1])
        training = v1.placeholder_with_default(False, [])
        keep_prob = v1.placeholder_with_default(1.0, [])

        def dense(h, units, name):
            w = v1.get_variable(f"{name}_w", [h.shape[-1], units], initializer=glorot())
            b = v1.get_variable(f"{name}_b", [units], initializer=v1.zeros_initializer())
            return tf.matmul(h, w) + b

        h = x
        if task == "cnn":
            for i, filters in enumerate(config.CNN_FILTERS, start=1):
                k = config.CNN_KERNEL
                w = v1.get_variable(f"conv{i}_w", [k, k, h.shape[-1], filters], initializer=glorot())
                b = v1.get_variable(f"conv{i}_b", [filters], initializer=v1.zeros_initializer())
                h = tf.nn.conv2d(h, w, strides=1, padding="SAME") + b
                gamma = v1.get_variable(f"bn{i}_gamma", [filters], initializer=v1.ones_initializer())
                beta = v1.get_variable(f"bn{i}_beta", [filters], initializer=v1.zeros_initializer())
                moving_mean = v1.get_variable(f"bn{i}_mean", [filters], trainable=False,
                                              initializer=v1.zeros_initializer())
                moving_var = v1.get_variable(f"bn{i}_var", [filters], trainable=False,
                                             initializer=v1.ones_initializer())
                mean, var = tf.nn.moments(h, axes=[0, 1, 2])
                v1.add_to_collection(v1.GraphKeys.UPDATE_OPS,
                                     v1.assign(moving_mean, 0.99 * moving_mean + 0.01 * mean))
                v1.add_to_collection(v1.GraphKeys.UPDATE_OPS,
                                     v1.assign(moving_var, 0.99 * moving_var + 0.01 * var))
                mean, var = tf.cond(training, lambda: (mean, var),
                                    lambda: (tf.identity(moving_mean), tf.identity(moving_var)))
                h = tf.nn.relu(tf.nn.batch_normalization(h, mean, var, beta, gamma, 1e-3))
                h = tf.nn.max_pool2d(h, config.CNN_POOL, config.CNN_POOL, "VALID")
            h = tf.reshape(h, [-1, int(np.prod(h.shape[1:]))])
            h = tf.nn.relu(dense(h, config.CNN_FC[0], "fc1"))
            h = tf.nn.dropout(h, rate=1.0 - keep_prob)
            h = tf.nn.relu(dense(h, config.CNN_FC[1], "fc2"))
            logits = dense(h, data.num_classes, "fc3")
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            targets = data.labels
        else:
            for i, units in enumerate(config.MLP_HIDDEN, start=1):
                h = tf.nn.relu(dense(h, units, f"fc{i}"))
            loss = tf.reduce_mean(tf.square(dense(h, 1, "fc3") - y))
            targets = data.y.reshape(-1, 1)
        with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
            train_op = v1.train.AdamOptimizer(LEARNING_RATE).minimize(loss)
        init = v1.global_variables_initializer()

    inputs = data.x
    rng = np.random.default_rng(config.SEED)
    with v1.Session(graph=graph) as sess:
        sess.run(init)

        def epoch_fn(epoch):
            order = rng.permutation(len(inputs))
            total = 0.0
            for i in range(0, len(inputs), BATCH_SIZE):
                index = order[i:i + BATCH_SIZE]
                _, batch_loss = sess.run([train_op, loss], feed_dict={
                    x: inputs[index], y: targets[index], training: True, keep_prob: 0.5})
                total += batch_loss
            return total

        return timed_epochs(epoch_fn, epochs)
