"""The two small models: a CNN for the digits and a word-level LSTM language model.

Both keep almost all parameters in weight matrices (so 99.9 % sparsity is
measurable in bytes) and are cheap enough to train many times on two cores.

Example::

    >>> from benchmarks.convergence.models import DigitsCNN, WordLSTM, n_params
    >>> n_params(DigitsCNN()), n_params(WordLSTM(2000))
    (540362, 390096)
"""

from __future__ import annotations

import torch
import torch.nn as nn


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class DigitsCNN(nn.Module):
    """conv3x3(16) - conv3x3(32) - maxpool - fc(1024) - fc(10) on 1x8x8 images."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 1024), nn.ReLU(), nn.Linear(1024, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class WordLSTM(nn.Module):
    """Embedding(128) - LSTM(128) - dropout - linear decoder tied to the embedding."""

    def __init__(self, vocab_size: int, dim: int = 128, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(dim, vocab_size)
        self.decoder.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor, hidden=None):
        out, hidden = self.lstm(self.drop(self.embed(x)), hidden)
        return self.decoder(self.drop(out)), hidden
