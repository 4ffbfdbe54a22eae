"""The built-in tasks' architectures, written here (torchvision beside the CPU torch on this
machine fails to import): the default digits CNN, residual blocks, MobileNetV2's depthwise
blocks, and a transformer encoder."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search.core.data import accuracy
from search.core.task import Task, trained_once


class DigitsNet(nn.Module):
    """Two 3x3 convs then a wide MLP head: the head dominates batch-1 latency (memory bound)."""

    def __init__(self, width: int = 5120) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 8 * 8, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 10)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.drop(F.relu(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-bn-relu-conv-bn plus the identity (or a 1x1 projection)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """A ResNet-10-style network for 16x16 inputs: stem, three stages of one block, head."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, identity when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        return x + out if self.use_skip else out


class MobileNetTiny(nn.Module):
    """A MobileNetV2-style network for 16x16 inputs."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, 1),
            InvertedResidual(width, 2 * width, 2),
            InvertedResidual(2 * width, 2 * width, 1),
            InvertedResidual(2 * width, 4 * width, 2),
        )
        self.head = nn.Conv2d(4 * width, 8 * width, 1, bias=False)
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.stem(x)))
        x = F.relu6(self.head(self.blocks(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EncoderBlock(nn.Module):
    """A post-norm transformer encoder block: self-attention, then a ReLU feed-forward."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class TransformerTiny(nn.Module):
    """A small transformer encoder over the 16 4x4 patches of a 16x16 image."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, 4 * dim) for _ in range(depth)])
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(b, 16, 16)
        h = self.blocks(self.embed(patches) + self.pos)
        return self.fc(h.mean(dim=1))


def digits_data(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """scikit-learn's digits, upsampled to 16x16; train / val / test 70/15/15, stratified by a
    fixed seed (test chooses nothing)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = np.arange(len(y))
    idx_train, idx_rest = train_test_split(idx, test_size=0.3, random_state=seed,
                                           stratify=y.numpy())
    idx_val, idx_test = train_test_split(idx_rest, test_size=0.5, random_state=seed,
                                         stratify=y.numpy()[idx_rest])
    return tuple((x[i], y[i]) for i in (idx_train, idx_val, idx_test))


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int,
          seed: int = 0, lr: float = 1e-3, batch: int = 64) -> nn.Module:
    """Plain supervised training (cross-entropy, Adam)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _digits_task(name: str, make_model: Callable[[], nn.Module], epochs: int,
                 seed: int) -> Task:
    """Build (seeded) and train a model on digits once; the weights are cached by its name and
    settings (`name` carries the model's size)."""
    train_data, val_data, test_data = digits_data(seed)
    torch.manual_seed(seed)
    family, _, size = name.partition("-")
    model = trained_once(make_model(), name, f"{family}-v1-{size[1:]}-{epochs}-{seed}-split3",
                         lambda m: train(m, train_data, epochs, seed))
    return Task(name, model, train_data, val_data, val_data[0][:1].clone(), accuracy,
                test=test_data)


def digits(width: int = 5120, epochs: int = 4, seed: int = 0) -> Task:
    """Two 3x3 convs and a wide MLP head (over-wide on purpose: a test fixture)."""
    return _digits_task(f"digits-w{width}", lambda: DigitsNet(width), epochs, seed)


def digits_resnet(width: int = 32, epochs: int = 6, seed: int = 0) -> Task:
    """A residual network (ResNet-10 style, BatchNorm, projection shortcuts) on digits."""
    return _digits_task(f"resnet-w{width}", lambda: ResNetTiny(width), epochs, seed)


def digits_mobilenet(width: int = 16, epochs: int = 6, seed: int = 0) -> Task:
    """A MobileNetV2-style network (depthwise convolutions, inverted residuals) on digits."""
    return _digits_task(f"mobilenet-w{width}", lambda: MobileNetTiny(width), epochs, seed)


def digits_transformer(dim: int = 64, epochs: int = 20, seed: int = 0) -> Task:
    """A transformer encoder (attention + feed-forward Linear layers) over image patches."""
    return _digits_task(f"transformer-d{dim}", lambda: TransformerTiny(dim), epochs, seed)
