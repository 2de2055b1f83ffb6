"""Define-and-run, step by step: ``python -m tf1_compat.session_basics``.

The course manual's walkthrough of TF1's execution model, printed as it runs,
then the same computation written eagerly in TensorFlow 2 (``tf.GradientTape``)
and in PyTorch (autograd) so the three can be read side by side. There is no
twin file: this one holds all three.

The computation, small enough to check by hand::

    y    = w * x + b            w = 0.5 a variable, b = 1 a constant, x = [1, 2, 3] fed
    loss = mean((y - t)^2)      t = [3, 5, 7] fed               -> y = [1.5, 2, 2.5], loss 10.5
    dloss/dw = mean(2 (y - t) x)                                 -> -14
    w <- w - 0.1 * dloss/dw     one gradient-descent step        -> w = 1.9

In TF1 the Python lines only *describe* this: they add nodes to a graph and
return symbolic ``Tensor`` handles without values. Numbers exist only inside
``sess.run(fetches, feed_dict)``, which executes the part of the graph the
fetches need, with placeholders replaced by the fed arrays. Variables live in the
Session, not in Python, and start uninitialised. In TF2 and PyTorch each line runs
when Python reaches it and returns values; gradients are recorded on a tape
(``tf.GradientTape``) or on the tensors themselves (``requires_grad``).

``define_and_run()``, ``eager_tf2()`` and ``eager_torch()`` return the same
quantities as dicts of numpy values, for the tests.
"""
import numpy as np
import torch  # before tensorflow: see common/frameworks.py (import-order rule)
import tensorflow as tf

X = np.array([1.0, 2.0, 3.0], np.float32)
T = np.array([3.0, 5.0, 7.0], np.float32)
W0 = 0.5
B = 1.0
LR = 0.1


def _say(verbose, text):
    if verbose:
        print(text)


def define_and_run(verbose=False):
    """TF1: build a graph, then run it in a Session. Returns y, loss, grad_w, w_after_step."""
    graph = tf.Graph()
    with graph.as_default():  # TF1 code in its own graph: the rest of the process stays eager
        # -- define: nothing is computed here ---------------------------------------------
        w = tf.compat.v1.Variable(W0, name="w")           # state, kept by the Session
        b = tf.constant(B, name="b")                      # a value baked into the graph
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")  # fed at run time
        t = tf.compat.v1.placeholder(tf.float32, [None], name="t")
        y = w * x + b
        loss = tf.reduce_mean(tf.square(y - t))
        # tf.gradients adds the backward ops to the graph and returns more symbolic tensors.
        (grad_w,) = tf.gradients(loss, [w])
        step = tf.compat.v1.assign_sub(w, LR * grad_w)
        initialize = tf.compat.v1.global_variables_initializer()
        _say(verbose, f"y is a symbolic handle, not a value:  {y}")
        _say(verbose, f"so is its gradient:                   {grad_w}")

    # -- run: values appear only inside sess.run ------------------------------------------
    with tf.compat.v1.Session(graph=graph) as sess:
        try:
            sess.run(w)
        except tf.errors.FailedPreconditionError as exc:
            lines = [line.strip() for line in exc.message.splitlines() if line.strip()]
            reason = next((line for line in lines if "uninitialized" in line), lines[-1])
            _say(verbose, f"sess.run(w) before initialising -> FailedPreconditionError: {reason}")
        sess.run(initialize)
        _say(verbose, f"sess.run(w) after the initializer -> {sess.run(w)!r}")
        feed = {x: X, t: T}
        y_value = sess.run(y, feed_dict={x: X})  # loss is not fetched, so t need not be fed
        _say(verbose, f"sess.run(y, feed_dict={{x: {X.tolist()}}}) -> {y_value!r}")
        loss_value, grad_value = sess.run([loss, grad_w], feed_dict=feed)
        _say(verbose, f"sess.run([loss, grad_w], feed_dict) -> {loss_value!r}, {grad_value!r}")
        sess.run(step, feed_dict=feed)  # the assign op changes the Session's w
        w_after = sess.run(w)
        _say(verbose, f"sess.run(step, feed_dict); sess.run(w) -> {w_after!r}")
    return {"y": y_value, "loss": loss_value, "grad_w": grad_value, "w_after_step": w_after}


def eager_tf2(verbose=False):
    """TF2: every line runs at once; GradientTape records what the gradient needs."""
    w = tf.Variable(W0, name="w")
    b = tf.constant(B)
    x, t = tf.constant(X), tf.constant(T)
    with tf.GradientTape() as tape:  # watches trainable variables used inside
        y = w * x + b
        loss = tf.reduce_mean(tf.square(y - t))
    grad_w = tape.gradient(loss, w)
    _say(verbose, f"y is a value already: {y.numpy()!r}; loss {loss.numpy()!r}; "
                  f"tape.gradient -> {grad_w.numpy()!r}")
    w.assign_sub(LR * grad_w)
    _say(verbose, f"w.assign_sub(lr * grad) -> w = {w.numpy()!r}")
    return {"y": y.numpy(), "loss": loss.numpy(), "grad_w": grad_w.numpy(),
            "w_after_step": w.numpy()}


def eager_torch(verbose=False):
    """PyTorch: tensors that require grad record their history; backward() fills .grad."""
    w = torch.tensor(W0, requires_grad=True)
    b = torch.tensor(B)
    x, t = torch.from_numpy(X), torch.from_numpy(T)
    y = w * x + b
    loss = torch.mean((y - t) ** 2)
    loss.backward()  # accumulates into w.grad (zero it before another backward)
    _say(verbose, f"y is a value already: {y.detach().numpy()!r}; loss {loss.item()!r}; "
                  f"loss.backward() -> w.grad = {w.grad.numpy()!r}")
    with torch.no_grad():  # the update itself must not be recorded
        w -= LR * w.grad
    _say(verbose, f"w -= lr * w.grad -> w = {w.detach().numpy()!r}")
    return {"y": y.detach().numpy(), "loss": loss.detach().numpy(), "grad_w": w.grad.numpy(),
            "w_after_step": w.detach().numpy()}


def main():
    results = {}
    for title, function in (("TF1: define, then run in a Session", define_and_run),
                            ("TF2: eager, tf.GradientTape", eager_tf2),
                            ("PyTorch: eager, autograd", eager_torch)):
        print(f"-- {title}")
        results[title] = function(verbose=True)
        print()
    print("-- the three side by side")
    for key in ("y", "loss", "grad_w", "w_after_step"):
        print(f"{key:13s}" + "  ".join(f"{np.array2string(np.asarray(r[key]), precision=4):>18s}"
                                       for r in results.values()))


if __name__ == "__main__":
    main()
