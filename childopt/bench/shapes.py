"""The parameter lists the benchmarks step: roberta-base (scalable), a 1.26B decoder and many tiny
tensors, as parameters (fp32 unless told) with fixed random gradients of their dtype, seeded so
every row sees the same data.
"""
from __future__ import annotations

from typing import Optional

import torch


def roberta_base_shapes(scale: float = 1.0, layers: Optional[int] = None) -> list[tuple[int, ...]]:
    """Parameter shapes of roberta-base with a sequence-classification head (~125M elements).

    ``scale`` shrinks the hidden size (rounded to a multiple of 64; the intermediate size stays
    4x hidden), the vocabulary and, unless ``layers`` is given, the number of layers, so smaller
    machines time the same mix of one huge embedding, square matrices and many tiny vectors.
    """
    hidden = 64 * max(1, round(768 * scale / 64))
    intermediate = 4 * hidden
    vocab = max(1, round(50265 * scale))
    layers = max(1, round(12 * scale)) if layers is None else layers
    shapes = [(vocab, hidden), (514, hidden), (1, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4          # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]                      # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,)]   # intermediate dense
        shapes += [(hidden, intermediate), (hidden,)]         # output dense
        shapes += [(hidden,), (hidden,)]                      # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]                   # pooler
    shapes += [(hidden, hidden), (hidden,), (2, hidden), (2,)]  # classifier dense and projection
    return shapes


def decoder_1b_shapes() -> list[tuple[int, ...]]:
    """A 1.26B-parameter LLaMA-style decoder: hidden 2048, 22 layers, SwiGLU 5632, vocab 32000, untied head."""
    hidden, intermediate, vocab, layers = 2048, 5632, 32000, 22
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)] + [(hidden,)] * 2
    return shapes + [(hidden,), (vocab, hidden)]


def many_tiny_shapes(count: int = 2000) -> list[tuple[int, ...]]:
    """``count`` tensors of 16 to 1024 elements: launch and host overhead, not bandwidth."""
    return [(16 * (1 + i % 64),) for i in range(count)]


def make_params(shapes, device: torch.device, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """``dtype`` parameters of ``shapes`` with random gradients of the same dtype set once (bf16
    parameters with bf16 gradients, as torch's fused AdamW takes them); seeded, so every row sees
    the same data."""
    torch.manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
        param.grad = torch.randn(shape, device=device, dtype=dtype)
        params.append(param)
    return params
