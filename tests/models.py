"""Small deterministic models and data shared by the multi-process tests."""

import torch
import torch.nn as nn


class EmbedNet(nn.Module):
    """Embedding (sparse gradients: few rows touched per batch) + head + an unused layer."""

    def __init__(self, unused: bool = False):
        super().__init__()
        self.embed = nn.Embedding(2000, 16)
        self.head = nn.Linear(16, 10)
        self.unused = nn.Linear(4, 4) if unused else None

    def forward(self, x):
        return self.head(self.embed(x).mean(1))


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if kind.startswith("embed"):
        return EmbedNet(unused=kind == "embed_unused")
    raise ValueError(kind)


def batch(kind: str, rank: int, step: int, size: int = 8):
    g = torch.Generator().manual_seed(1000 * rank + step)
    if kind.startswith("embed"):
        x = torch.randint(0, 2000, (size, 4), generator=g)
    else:
        x = torch.randn(size, 32, generator=g)
    return x, torch.randint(0, 10, (size,), generator=g)


def loss_of(model, kind, rank, step):
    x, y = batch(kind, rank, step)
    if x.is_floating_point():
        x = x.to(next(model.parameters()).dtype)
    return nn.functional.cross_entropy(model(x).float(), y)


def train_steps(model, opt, rank, steps, kind="mlp") -> None:
    """One optimizer step per index in ``steps`` on ``rank``'s batches of ``kind`` (deterministic data)."""
    for step in steps:
        opt.zero_grad()
        loss_of(model, kind, rank, step).backward()
        opt.step()


def params_hash(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_past_default_warmup(model, opt, rank: int, features: int, batch: int) -> None:
    """``DEFAULT_WARMUP_STEPS + 1`` optimizer steps on random 10-class data (the README snippets' check)."""
    from gradsparse.schedule import DEFAULT_WARMUP_STEPS

    gen = torch.Generator().manual_seed(rank)
    for _ in range(DEFAULT_WARMUP_STEPS + 1):
        x, y = torch.randn(batch, features, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def pairs_at(module: nn.Module, ratio: float = 0.001, min_compress_numel: int = 4096) -> int:
    """Pairs a step sends at ``ratio`` with the default ``min_compress_numel`` (k = ceil(ratio * n) per tensor)."""
    import math

    return sum(math.ceil(ratio * p.numel()) for p in module.parameters() if p.numel() >= min_compress_numel)
