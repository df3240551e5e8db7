"""Real data available without a download, split and tokenized deterministically.

* ``digits()``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), a fixed
  80/20 train/validation split.
* ``corpus()``: the English documentation text that ships with CPython
  (``pydoc_data.topics``), word-tokenized, with a frequency-ranked vocabulary;
  the first 90 % of the token stream trains, the rest validates.

Example::

    >>> from benchmarks.convergence.data import corpus, digits
    >>> d = digits()
    >>> tuple(d.x_train.shape), tuple(d.x_val.shape), d.n_classes
    ((1438, 1, 8, 8), (359, 1, 8, 8), 10)
    >>> c = corpus(vocab_size=2000)
    >>> len(c.vocab), c.train.numel() > 50_000
    (2000, True)
"""

from __future__ import annotations

import collections
import dataclasses
import re

import torch

SPLIT_SEED = 20171205  # the split never depends on the training seed
TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
UNK = "<unk>"
EOS = "<eos>"


@dataclasses.dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int = 10


@dataclasses.dataclass(frozen=True)
class Corpus:
    vocab: list[str]
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor


def digits(val_fraction: float = 0.2) -> Digits:
    """scikit-learn's digits as float tensors in [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(val_fraction * len(y))
    val, train = order[:n_val], order[n_val:]
    return Digits(x[train], y[train], x[val], y[val])


def corpus_text() -> str:
    """CPython's pydoc topic texts, in sorted topic order (about 465k characters)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def tokenize(text: str) -> list[str]:
    """Lower-case words, numbers and single punctuation marks; one ``<eos>`` per line with a word.

    >>> tokenize("Hello, World 42\\n*****\\nbye")
    ['hello', ',', 'world', '42', '<eos>', 'bye', '<eos>']
    """
    tokens = []
    for line in text.lower().splitlines():
        words = TOKEN.findall(line)
        if any(w[0].isalnum() for w in words):  # drops empty lines and reST rules such as "*****"
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def corpus(vocab_size: int = 2000, val_fraction: float = 0.1) -> Corpus:
    """Token ids of the pydoc corpus; the ``vocab_size - 1`` most frequent tokens (ties: alphabetical) + ``<unk>``."""
    tokens = tokenize(corpus_text())
    counts = collections.Counter(tokens)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[: vocab_size - 1]
    vocab = [UNK, *ranked]
    index = {t: i for i, t in enumerate(vocab)}
    ids = torch.tensor([index.get(t, 0) for t in tokens], dtype=torch.int64)
    cut = round((1 - val_fraction) * len(ids))
    return Corpus(vocab, ids[:cut], ids[cut:])
