"""Models for the end-to-end DDP benchmark: ResNet-50 (its exact parameter shapes), an LSTM language model, and a
small MLP for quick checks (tests, ``python -m benchmarks.demo --model mlp``).

torchvision has no CPU build here, so ResNet-50 is written out (bottleneck v1.5, as
torchvision's ``resnet50()``: 25,557,032 parameters, 161 tensors). Its forward is cheap
on a small input (32x32 by default), since several ranks share two cores; the
gradient, which is what the network carries, has the full size either way.

Example::

    >>> from benchmarks.bench_models import make_model, make_batch
    >>> sum(p.numel() for p in make_model("resnet50").parameters())
    25557032
    >>> sum(p.numel() for p in make_model("lstm").parameters())
    14452496
    >>> sum(p.numel() for p in make_model("mlp").parameters())
    133898
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    """ResNet-50 for 1000 classes: layers (3, 4, 6, 3) of bottleneck blocks."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LSTMLM(nn.Module):
    """Two-layer LSTM language model (vocabulary 10,000, width 512, untied embedding and decoder)."""

    def __init__(self, vocab: int = 10000, width: int = 512, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, layers, batch_first=True)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.decoder(out)


def mlp() -> nn.Module:
    """Two linear layers, 512 -> 256 -> 10 (133,898 parameters): a step costs milliseconds."""
    return nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


MODELS = ("resnet50", "lstm", "mlp")


def make_model(kind: str) -> nn.Module:
    if kind == "resnet50":
        return ResNet50()
    if kind == "lstm":
        return LSTMLM()
    if kind == "mlp":
        return mlp()
    raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")


def make_batch(kind: str, batch: int, generator: torch.Generator, image_size: int = 32, seq_len: int = 16):
    """(input, target) of one step; the loss is cross-entropy for both models."""
    if kind == "resnet50":
        return (torch.randn(batch, 3, image_size, image_size, generator=generator),
                torch.randint(0, 1000, (batch,), generator=generator))
    if kind == "mlp":
        return torch.randn(batch, 512, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    tokens = torch.randint(0, 10000, (batch, seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "lstm":
        return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return nn.functional.cross_entropy(output, target)
