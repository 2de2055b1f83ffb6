"""A two-layer MLP with hand-written forward and backward passes (no autograd).

``python -m torch_impl.scratch``: the course notebook's network, Linear -> ReLU ->
Linear -> softmax cross-entropy, trained with plain SGD on the bundled 8x8 digits
(flattened to 64 features) on CPU or GPU. Tensors are used only as arrays: every
gradient below is derived by hand, and ``parity_tests/test_torch_impl.py`` checks
it against autograd. Weights use torch's layout, (out, in) with y = x W^T + b.
"""
import argparse

import torch

from common.datasets import batch_indices, load_dataset
from common.runner import run_main
from torch_impl.train import resolve_device


class Linear:
    """y = x W^T + b, with W (out, in) initialised like torch.nn.Linear."""

    def __init__(self, n_in, n_out, generator, dtype=torch.float32):
        bound = n_in ** -0.5
        self.weight = (torch.rand(n_out, n_in, generator=generator, dtype=dtype) * 2 - 1) * bound
        self.bias = (torch.rand(n_out, generator=generator, dtype=dtype) * 2 - 1) * bound
        self.grad_weight = self.grad_bias = self.x = None

    def forward(self, x):
        self.x = x  # kept for the backward pass
        return x @ self.weight.T + self.bias

    def backward(self, grad_out):
        """dL/dy (N, out) -> dL/dx (N, in); stores dL/dW and dL/db."""
        self.grad_weight = grad_out.T @ self.x
        self.grad_bias = grad_out.sum(dim=0)
        return grad_out @ self.weight

    def parameters(self):
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]


class ReLU:
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, grad_out):
        return grad_out * self.mask  # the gradient passes where the input was positive


class SoftmaxCrossEntropy:
    """Mean cross-entropy of logits against class indices (like F.cross_entropy)."""

    def forward(self, logits, labels):
        shifted = logits - logits.max(dim=1, keepdim=True).values  # exp cannot overflow
        log_probs = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
        self.probs, self.labels = log_probs.exp(), labels
        return -log_probs[torch.arange(len(labels)), labels].mean()

    def backward(self):
        """dL/dlogits = (softmax - one_hot) / N."""
        grad = self.probs.clone()
        grad[torch.arange(len(self.labels)), self.labels] -= 1
        return grad / len(self.labels)


class TwoLayerMLP:
    def __init__(self, n_in, n_hidden, n_classes, seed=0, dtype=torch.float32, device="cpu"):
        generator = torch.Generator().manual_seed(seed)  # CPU generator: same init on any device
        self.fc1 = Linear(n_in, n_hidden, generator, dtype)
        self.relu = ReLU()
        self.fc2 = Linear(n_hidden, n_classes, generator, dtype)
        self.loss = SoftmaxCrossEntropy()
        for layer in (self.fc1, self.fc2):
            layer.weight, layer.bias = layer.weight.to(device), layer.bias.to(device)

    def forward(self, x):
        return self.fc2.forward(self.relu.forward(self.fc1.forward(x)))

    def loss_and_gradients(self, x, labels):
        """Forward, loss, then the chain rule backwards layer by layer."""
        loss = self.loss.forward(self.forward(x), labels)
        grad = self.loss.backward()
        grad = self.fc2.backward(grad)
        grad = self.relu.backward(grad)
        self.fc1.backward(grad)
        return loss, {"fc1.weight": self.fc1.grad_weight, "fc1.bias": self.fc1.grad_bias,
                      "fc2.weight": self.fc2.grad_weight, "fc2.bias": self.fc2.grad_bias}

    def sgd_step(self, lr):
        for layer in (self.fc1, self.fc2):
            for param, grad in layer.parameters():
                param -= lr * grad  # in place: plain tensors, nothing records it


def accuracy(model, x, labels):
    return (model.forward(x).argmax(dim=1) == labels).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m torch_impl.scratch",
                                     description="Two-layer MLP with a hand-written backward pass.")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    data = load_dataset("digits", "image", seed=args.seed)
    # (N, 8, 8, 1) images -> (N, 64) feature rows.
    x_train = torch.from_numpy(data.x_train.reshape(len(data.x_train), -1)).to(device)
    y_train = torch.from_numpy(data.y_train).to(device)
    x_test = torch.from_numpy(data.x_test.reshape(len(data.x_test), -1)).to(device)
    y_test = torch.from_numpy(data.y_test).to(device)
    model = TwoLayerMLP(x_train.shape[1], args.hidden, data.num_classes, args.seed, device=device)
    for epoch in range(1, args.epochs + 1):
        for index in batch_indices(len(x_train), args.batch_size, args.seed, epoch):
            index = torch.from_numpy(index).to(device)
            loss, _ = model.loss_and_gradients(x_train[index], y_train[index])
            model.sgd_step(args.lr)
        print(f"epoch {epoch}/{args.epochs}: last batch loss {loss.item():.4f}, "
              f"train accuracy {accuracy(model, x_train, y_train):.4f}")
    print(f"test accuracy {accuracy(model, x_test, y_test):.4f} on {device}")


if __name__ == "__main__":
    run_main(main)
