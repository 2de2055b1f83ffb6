"""The course manual's training pipelines, the references the implementations are measured
against, written as the manual (and the frameworks' tutorials) wrote them.

* ``manual torch DataLoader pipeline``: a ``DataLoader`` (batch 100, ``shuffle=True``) over,
  for the CNN, a ``Dataset`` that like torchvision's ``CIFAR10`` makes a PIL image per sample
  and applies ``ToTensor`` + ``Normalize``, for the MLP a ``TensorDataset``; the shared model
  with the course's ``nn.Conv2d`` (bias on, as in the Keras and TF1 references),
  ``optim.Adam``, ``running_loss += loss.item()``.
* ``manual TF2 GradientTape loop`` / ``manual Keras fit``: a Keras ``Sequential`` model
  ending in softmax, Keras defaults elsewhere, on ``tf.data`` ``.shuffle(n).batch(100)``.
* ``manual TF1 graph``: placeholders, ``get_variable``, ``tf.nn`` ops,
  ``AdamOptimizer().minimize``, ``sess.run`` with a ``feed_dict`` per batch.

Each sets its pipeline up (importing its framework) and returns ``epoch(n)``: train, seconds.
"""
import time

import numpy as np

from common import config

BATCH_SIZE, LEARNING_RATE = config.BATCH_SIZE, config.LEARNING_RATE
MANUAL_TASKS = ("cnn", "mlp")  # the manual has no recurrent program


def clocked(train):
    """An epoch function returning the seconds `train(epoch)` took."""
    def epoch(n):
        start = time.perf_counter()
        train(n)
        return time.perf_counter() - start
    return epoch


def fit_epochs(model, inputs, **fit_args):
    """An epoch function that runs one ``model.fit`` epoch on `inputs(n)` and returns the
    seconds from the epoch's start to the end of its last batch: fit's set-up and the
    teardown of its iterator stay off the clock, the same for every fit pipeline."""
    from tensorflow import keras
    marks = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda n, logs: marks.append(time.perf_counter()),
        on_epoch_end=lambda n, logs: marks.append(time.perf_counter()))

    def epoch(n):
        marks.clear()
        model.fit(inputs(n), epochs=1, verbose=0, callbacks=[clock], **fit_args)
        return marks[1] - marks[0]
    return epoch


def manual_torch(task, data, device):
    import torch
    from PIL import Image
    from torch import nn
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from torch_impl.models import build_cnn, build_mlp

    class PILImages(Dataset):
        """What torchvision.datasets.CIFAR10 does per item: uint8 HWC -> PIL -> transform."""

        def __len__(self):
            return len(data.images)

        def __getitem__(self, index):
            return transform(Image.fromarray(data.images[index])), int(data.y[index])

    torch.manual_seed(config.SEED)
    device = torch.device("cuda" if device == "cuda" else "cpu")
    if task == "cnn":
        from torchvision import transforms
        transform = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(data.mean.tolist(), data.std.tolist())])
        dataset = PILImages()
        model, criterion = build_cnn(data.input_shape, data.num_classes), nn.CrossEntropyLoss()
        for name in ("conv1", "conv2", "conv3"):  # the course's nn.Conv2d keeps its bias
            conv = getattr(model, name)
            setattr(model, name, nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1))
    else:
        dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
        model, criterion = build_mlp(data.input_shape[-1]), nn.MSELoss()
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def train(n):
        model.train()
        running_loss = 0.0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        return running_loss / len(loader)

    return clocked(train)


def _keras_setup(task, data):
    """The manual's Keras model (seeded), its loss, Adam and the tf.data feed."""
    import tensorflow as tf
    from tensorflow import keras
    from tensorflow.keras import layers
    tf.random.set_seed(config.SEED)
    model = keras.Sequential([keras.Input(shape=data.input_shape)])
    if task == "mlp":
        for units in config.MLP_HIDDEN:
            model.add(layers.Dense(units, activation="relu"))
        model.add(layers.Dense(1))
        loss_fn = keras.losses.MeanSquaredError()
    else:
        for filters in config.CNN_FILTERS:
            model.add(layers.Conv2D(filters, config.CNN_KERNEL, padding="same"))
            model.add(layers.BatchNormalization())
            model.add(layers.Activation("relu"))
            model.add(layers.MaxPooling2D(config.CNN_POOL))
        model.add(layers.Flatten())
        model.add(layers.Dense(config.CNN_FC[0], activation="relu"))
        model.add(layers.Dropout(config.DROPOUT))
        model.add(layers.Dense(config.CNN_FC[1], activation="relu"))
        model.add(layers.Dense(data.num_classes, activation="softmax"))
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
    dataset = tf.data.Dataset.from_tensor_slices((data.x, data.y)).shuffle(len(data.x))
    return (model, loss_fn, keras.optimizers.Adam(learning_rate=LEARNING_RATE),
            dataset.batch(BATCH_SIZE))


def manual_tf2_loop(task, data, device):
    import tensorflow as tf
    model, loss_fn, optimizer, dataset = _keras_setup(task, data)

    @tf.function
    def train_step(inputs, targets):
        with tf.GradientTape() as tape:
            loss = loss_fn(targets, model(inputs, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def train(n):
        total = 0.0
        for inputs, targets in dataset:
            total += train_step(inputs, targets)  # a tensor: no host round trip per step
        return float(total)  # waits for the last step

    return clocked(train)


def manual_keras_fit(task, data, device):
    model, loss_fn, optimizer, dataset = _keras_setup(task, data)
    model.compile(optimizer=optimizer, loss=loss_fn, metrics=["accuracy"] if task == "cnn" else [])
    return fit_epochs(model, lambda n: dataset)


def manual_tf1_graph(task, data, device):
    import tensorflow as tf
    v1 = tf.compat.v1
    v1.disable_v2_behavior()  # TF1 semantics, as the manual's TF1 code had them
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(config.SEED)
        glorot, zeros, ones = (v1.glorot_uniform_initializer, v1.zeros_initializer,
                               v1.ones_initializer)
        x = v1.placeholder(tf.float32, [None, *data.input_shape])
        y = v1.placeholder(tf.int64 if task == "cnn" else tf.float32, [None, *data.y.shape[1:]])
        training = v1.placeholder_with_default(False, [])
        keep_prob = v1.placeholder_with_default(1.0, [])

        def dense(h, units, name):
            w = v1.get_variable(f"{name}_w", [h.shape[-1], units], initializer=glorot())
            b = v1.get_variable(f"{name}_b", [units], initializer=zeros())
            return tf.matmul(h, w) + b

        h = x
        if task == "cnn":
            for i, filters in enumerate(config.CNN_FILTERS, start=1):
                k = config.CNN_KERNEL
                w = v1.get_variable(f"conv{i}_w", [k, k, h.shape[-1], filters],
                                    initializer=glorot())
                b = v1.get_variable(f"conv{i}_b", [filters], initializer=zeros())
                h = tf.nn.conv2d(h, w, strides=1, padding="SAME") + b
                gamma, beta, moving_mean, moving_var = (
                    v1.get_variable(f"bn{i}_{name}", [filters], initializer=init(),
                                    trainable=name in ("gamma", "beta"))
                    for name, init in (("gamma", ones), ("beta", zeros), ("mean", zeros),
                                       ("var", ones)))
                mean, var = tf.nn.moments(h, axes=[0, 1, 2])
                for moving, batch in ((moving_mean, mean), (moving_var, var)):
                    v1.add_to_collection(v1.GraphKeys.UPDATE_OPS,
                                         v1.assign(moving, 0.99 * moving + 0.01 * batch))
                mean, var = tf.cond(training, lambda: (mean, var),
                                    lambda: (tf.identity(moving_mean), tf.identity(moving_var)))
                h = tf.nn.relu(tf.nn.batch_normalization(h, mean, var, beta, gamma, 1e-3))
                h = tf.nn.max_pool2d(h, config.CNN_POOL, config.CNN_POOL, "VALID")
            h = tf.reshape(h, [-1, int(np.prod(h.shape[1:]))])
            h = tf.nn.relu(dense(h, config.CNN_FC[0], "fc1"))
            h = tf.nn.dropout(h, rate=1.0 - keep_prob)
            h = tf.nn.relu(dense(h, config.CNN_FC[1], "fc2"))
            logits = dense(h, data.num_classes, "fc3")
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        else:
            for i, units in enumerate(config.MLP_HIDDEN, start=1):
                h = tf.nn.relu(dense(h, units, f"fc{i}"))
            loss = tf.reduce_mean(tf.square(dense(h, 1, "fc3") - y))
        with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
            train_op = v1.train.AdamOptimizer(LEARNING_RATE).minimize(loss)
        init = v1.global_variables_initializer()

    sess = v1.Session(graph=graph)
    sess.run(init)
    rng = np.random.default_rng(config.SEED)

    def train(n):
        order = rng.permutation(len(data.x))
        total = 0.0
        for i in range(0, len(order), BATCH_SIZE):
            index = order[i:i + BATCH_SIZE]
            _, batch_loss = sess.run([train_op, loss], feed_dict={
                x: data.x[index], y: data.y[index], training: True, keep_prob: 0.5})
            total += batch_loss
        return total

    return clocked(train)


MANUAL = {"manual torch DataLoader pipeline": manual_torch,
          "manual TF2 GradientTape loop": manual_tf2_loop,
          "manual Keras fit": manual_keras_fit,
          "manual TF1 graph": manual_tf1_graph}
