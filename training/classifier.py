"""A small FashionMNIST classifier whose penultimate features score generated images (``ddpm-eval``).

``python -m training.classifier --data-root /usr/share/datasets/fashion-mnist --out runtime/assets/...onnx`` trains
it (plain PyTorch, a few minutes on a CPU) and exports an ONNX model with outputs ``logits`` (B, 10) and
``features`` (B, 128), input ``x`` float32 (B, 1, 32, 32) in [-1, 1] — the images exactly as the DDPM sees them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.evaluate.idx import FASHION_MNIST_CLASSES, find_split, pad_to_32, read_split
from runtime.files import atomic_path

FEATURES = 128


class Classifier(nn.Module):
    """Two conv blocks (32 and 64 channels) and a 128-d feature layer: forward(x) -> (logits, features)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, 32), block(32, 64), nn.Flatten())
        self.features = nn.Sequential(nn.Dropout(0.3), nn.Linear(64 * 8 * 8, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(self.body(x))
        return self.head(f), f


def load(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    found = find_split([root, root / "FashionMNIST" / "raw"], train)
    if found is None:
        raise click.ClickException(f"FashionMNIST not found in {root}; apt-get install -y dataset-fashion-mnist")
    images, labels = read_split(*found, num_classes=10)
    x = torch.from_numpy(pad_to_32(images).astype(np.float32) / 127.5 - 1.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def accuracy(net: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = sum((net(x[i:i + 1000])[0].argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
    return correct / len(x)


@click.command()
@click.option("--data-root", default="/usr/share/datasets/fashion-mnist", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--epochs", default=4, type=int)
@click.option("--seed", default=0, type=int)
def main(data_root: str, out: str, epochs: int, seed: int) -> None:
    """Train the classifier and export it to ONNX (logits and features)."""
    import onnx

    torch.manual_seed(seed)
    x, y = load(Path(data_root), True)
    xt, yt = load(Path(data_root), False)
    net = Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (len(x) // 128))
    start = time.time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(len(x) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            xb = x[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(-1), xb)  # horizontal flips
            loss = F.cross_entropy(net(xb)[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(net, xt, yt)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.4f}, {time.time() - start:.0f} s",
              file=sys.stderr)
    net.eval()
    program = torch.onnx.export(net, (xt[:2],), dynamo=True, input_names=["x"], output_names=["logits", "features"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}})
    model = program.model_proto
    onnx.helper.set_model_props(model, {"test_accuracy": f"{acc:.4f}", "dataset": "fashion-mnist",
                                        "classes": ",".join(FASHION_MNIST_CLASSES), "epochs": str(epochs)})
    onnx.checker.check_model(model)
    with atomic_path(out) as tmp:  # a reader never sees a partial classifier
        onnx.save(model, str(tmp))
    click.echo(f"wrote {out}: test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
