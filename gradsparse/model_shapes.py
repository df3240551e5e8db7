"""Parameter shapes of reference models, without building them: for cost predictions and ``gradsparse.advise``.

Each function returns ``[(name, shape), ...]`` in ``model.named_parameters()`` order.

- :func:`resnet50`: torchvision's ResNet-50 (bottleneck v1.5, 1000 classes): 25,557,032
  parameters in 161 tensors (the same as ``benchmarks/bench_models.py``'s model).
- :func:`transformer`: a GPT-style decoder (learned positions, pre-norm, 4x MLP, tied
  output embedding); :func:`transformer_1b` is 18 layers of width 2048 over a 50,304-token
  vocabulary with 2,048 positions: 1,013,669,888 parameters in 220 tensors.
- :func:`mlp`: 512 -> 256 -> 10 (133,898 parameters), for quick runs.

Example::

    >>> from gradsparse.model_shapes import numel, resnet50, transformer_1b
    >>> numel(resnet50()), len(resnet50())
    (25557032, 161)
    >>> numel(transformer_1b())
    1013669888
"""

from __future__ import annotations

import math

Shapes = list[tuple[str, tuple[int, ...]]]


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


def resnet50(num_classes: int = 1000) -> Shapes:
    out: Shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            p, width = f"layer{stage}.{b}", planes * 4
            out += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1)), (f"{p}.bn1.weight", (planes,)),
                    (f"{p}.bn1.bias", (planes,)), (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                    (f"{p}.bn2.weight", (planes,)), (f"{p}.bn2.bias", (planes,)),
                    (f"{p}.conv3.weight", (width, planes, 1, 1)), (f"{p}.bn3.weight", (width,)),
                    (f"{p}.bn3.bias", (width,))]
            if b == 0:
                out += [(f"{p}.downsample.0.weight", (width, inplanes, 1, 1)),
                        (f"{p}.downsample.1.weight", (width,)), (f"{p}.downsample.1.bias", (width,))]
            inplanes = width
    return out + [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]


def transformer(layers: int, width: int, vocab: int, positions: int) -> Shapes:
    """GPT-style decoder: embeddings, per layer LayerNorm, fused QKV, output projection, LayerNorm, 4x MLP."""
    out: Shapes = [("wte.weight", (vocab, width)), ("wpe.weight", (positions, width))]
    for i in range(layers):
        p = f"h.{i}"
        out += [(f"{p}.ln_1.weight", (width,)), (f"{p}.ln_1.bias", (width,)),
                (f"{p}.attn.qkv.weight", (3 * width, width)), (f"{p}.attn.qkv.bias", (3 * width,)),
                (f"{p}.attn.proj.weight", (width, width)), (f"{p}.attn.proj.bias", (width,)),
                (f"{p}.ln_2.weight", (width,)), (f"{p}.ln_2.bias", (width,)),
                (f"{p}.mlp.fc.weight", (4 * width, width)), (f"{p}.mlp.fc.bias", (4 * width,)),
                (f"{p}.mlp.proj.weight", (width, 4 * width)), (f"{p}.mlp.proj.bias", (width,))]
    return out + [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]


def transformer_1b() -> Shapes:
    return transformer(layers=18, width=2048, vocab=50_304, positions=2048)


def mlp() -> Shapes:
    return [("0.weight", (256, 512)), ("0.bias", (256,)), ("2.weight", (10, 256)), ("2.bias", (10,))]


BUILTIN = {"resnet50": resnet50, "transformer1b": transformer_1b, "mlp": mlp}
