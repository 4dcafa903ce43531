"""Where each parameter of a transformer sits: its layer, and which attention head owns which entries.

A :class:`HeadLayout` is read from a model's config (``num_hidden_layers``, ``num_attention_heads``,
``hidden_size``, ``num_key_value_heads``, ``head_dim``) and its parameter names and shapes, for two
naming families:

* BERT/RoBERTa-style encoders, ``...encoder.layer.<i>.attention.self.{query,key,value}.{weight,bias}``;
* LLaMA-style decoders, ``...layers.<i>.self_attn.{q,k,v}_proj.{weight,bias}`` and ``o_proj.weight``,
  with grouped-query attention (``num_key_value_heads < num_attention_heads``); the output projection
  may also be OPT's ``out_proj.weight`` or Phi's ``dense.weight``.

Query, key and value rows are head-major: head ``h`` owns rows ``h*head_dim .. (h+1)*head_dim - 1``
(of the bias too); the output projection (``attention.output.dense.weight``, ``o_proj.weight``)
reads head ``h`` through the same range of its *columns*.  Under grouped-query attention the key
and value rows are split into ``num_key_value_heads`` heads, and query head ``h`` reads key/value
head ``h // (num_attention_heads / num_key_value_heads)`` (transformers' ``repeat_kv``); a key/value
head's entries are shared out equally among the query heads that read it, so the per-head sums of a
layer add up to its attention total.  Every other parameter of a layer (feed-forward, LayerNorms,
the output projection's bias) is the layer's ``other`` part; parameters outside the layers
(embeddings, pooler, classifier) are not in the picture.

Each of the config's layers must have its query, key/value and one output projection, and all
layers one prefix: a model with fewer layers than its config, shared layers, an encoder-decoder or
a second (cross-)attention is refused rather than summed into plausible numbers.

Why a layout of its own: the per-head questions (where does the child network live, how far does
each head move) need the same slicing for Fisher scores, masks and weight differences, and a slicing
that is off by one row or transposed would still give plausible-looking numbers; one place does it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

QUERY, KEY_VALUE, OUTPUT, OTHER = "query", "key_value", "output", "other"


@dataclass(frozen=True)
class Family:
    """The parameter names of one architecture family: a layer's prefix and its attention projections."""

    label: str
    layer: re.Pattern  # group 1: the stack (the name up to the index), group 2: the layer index, group 3: the rest
    query: re.Pattern  # rows split into num_attention_heads
    key_value: re.Pattern  # rows split into num_key_value_heads
    output: re.Pattern  # columns split into num_attention_heads
    example: str
    outputs: str  # the output projection's names, for messages

    def role(self, rest: str) -> str:
        """How a parameter named ``<layer prefix>.<rest>`` is split into heads."""
        for role, pattern in ((QUERY, self.query), (KEY_VALUE, self.key_value), (OUTPUT, self.output)):
            if pattern.fullmatch(rest):
                return role
        return OTHER


FAMILIES = (
    Family("BERT/RoBERTa-style encoder", re.compile(r"((?:.*\.)?encoder\.layer)\.(\d+)\.(.+)"),
           re.compile(r"attention\.self\.query\.(?:weight|bias)"),
           re.compile(r"attention\.self\.(?:key|value)\.(?:weight|bias)"),
           re.compile(r"attention\.output\.dense\.weight"), "encoder.layer.<i>.attention.self.query.weight",
           "attention.output.dense.weight"),
    Family("LLaMA-style decoder", re.compile(r"((?:.*\.)?layers)\.(\d+)\.(.+)"),
           re.compile(r"self_attn\.q_proj\.(?:weight|bias)"),
           re.compile(r"self_attn\.[kv]_proj\.(?:weight|bias)"),
           re.compile(r"self_attn\.(?:o_proj|out_proj|dense)\.weight"), "model.layers.<i>.self_attn.q_proj.weight",
           "self_attn.o_proj.weight (OPT: out_proj, Phi: dense)"),
)
# A query, key or value projection of some attention: one the family does not split (a cross-attention) is refused.
PROJECTION = re.compile(r"(?:.+\.)?(?:[qkv]_proj|query|key|value)\.(?:weight|bias)")


def _config_int(config, key: str, default: Optional[int] = None) -> int:
    value = getattr(config, key, None)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"the model config's {key} must be an int >= 1, got {value!r} (expected the config of a "
                         "transformers encoder or decoder with attention heads)")
    return value


@dataclass(frozen=True)
class HeadLayout:
    """Layers and heads of one model: which entries of each parameter belong to which head.

    Build it with :meth:`from_model` or :meth:`from_config`; :meth:`head_sums` and :meth:`reduce`
    sum any per-entry quantity (Fisher scores, a kept mask, squared updates) by head and layer.
    """

    family: Family
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    shapes: Mapping[str, tuple[int, ...]]  # every parameter of the model, by name

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "HeadLayout":
        """The layout of a transformers model (its ``config`` and ``named_parameters()``)."""
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"{type(model).__name__} has no .config: pass a transformers model, or use "
                             "HeadLayout.from_config(config, shapes)")
        return cls.from_config(config, {name: tuple(p.shape) for name, p in model.named_parameters()})

    @classmethod
    def from_config(cls, config, shapes: Mapping[str, Sequence[int]]) -> "HeadLayout":
        """The layout of the parameters ``shapes`` (name -> shape) of a model with ``config``.

        Raises:
            ValueError: the config lacks the head counts, the names are of neither family (or of
                a LoRA-wrapped model), an attention parameter's shape does not split into the
                config's heads (the message names the parameter and the expected shape), or the layers
                are not one stack of ``num_hidden_layers``, each with one self-attention the layout splits
                (an encoder-decoder, a cross-attention, an unknown output projection, shared layers).
        """
        shapes = {name: tuple(int(n) for n in shape) for name, shape in shapes.items()}
        wrapped = [name for name in shapes if ".base_layer." in name or ".lora_" in name]
        if wrapped:
            raise ValueError(f"{wrapped[0]!r} is a parameter of a LoRA-wrapped model; merge it first "
                             "(peft: model.merge_and_unload()) so the attention weights carry their own names")
        family = _family(shapes)
        heads = _config_int(config, "num_attention_heads")
        hidden = _config_int(config, "hidden_size")
        kv_heads = _config_int(config, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise ValueError(f"the model config's num_attention_heads ({heads}) is not a multiple of its "
                             f"num_key_value_heads ({kv_heads})")
        if getattr(config, "head_dim", None) is None and hidden % heads:
            raise ValueError(f"the model config's hidden_size ({hidden}) is not a multiple of its "
                             f"num_attention_heads ({heads})")
        layout = cls(family, _config_int(config, "num_hidden_layers"), heads, kv_heads,
                     _config_int(config, "head_dim", hidden // heads), shapes)
        layout._check_layers()
        return layout

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def place(self, name: str) -> Optional[tuple[int, str]]:
        """(layer, role) of a parameter name, role one of query/key_value/output/other; None outside the layers."""
        match = self.family.layer.fullmatch(name)
        if match is None:
            return None
        return int(match.group(2)), self.family.role(match.group(3))

    def expected_shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` in the model, or a ValueError when the model has no such parameter."""
        if name not in self.shapes:
            raise ValueError(f"{name!r} is not a parameter of the model (expected names like "
                             f"{self.family.example}); is it from another architecture?")
        return self.shapes[name]

    def check(self, name: str, shape: Sequence[int], what: str) -> None:
        """Raise unless ``what``'s tensor ``name`` of ``shape`` fits this layout: its layer exists and its
        attention rows or columns split into heads of ``head_dim``."""
        place = self.place(name)
        if place is None:
            return
        layer, role = place
        if layer >= self.num_layers:
            raise ValueError(f"{name!r} ({what}) is in layer {layer}, but the config has num_hidden_layers="
                             f"{self.num_layers}")
        shape = tuple(shape)
        width = (self.num_kv_heads if role == KEY_VALUE else self.num_heads) * self.head_dim
        if role in (QUERY, KEY_VALUE) and (len(shape) not in (1, 2) or shape[0] != width):
            count = "num_key_value_heads" if role == KEY_VALUE else "num_attention_heads"
            raise ValueError(f"{name!r} ({what}): expected {width} rows ({count} x head_dim "
                             f"{self.head_dim}), got shape {shape}")
        if role == OUTPUT and (len(shape) != 2 or shape[1] != width):
            raise ValueError(f"{name!r} ({what}): expected a matrix of {width} columns (num_attention_heads "
                             f"{self.num_heads} x head_dim {self.head_dim}), got shape {shape}")

    def _check_layers(self) -> None:
        """Raise unless the layer parameters are one stack of ``num_layers`` layers, each parameter fits
        (:meth:`check`), and each layer has one attention whose query, key/value and output projections the
        layout splits."""
        stacks: dict[str, str] = {}  # stack -> its first parameter
        layers: dict[int, list[tuple[str, str, str]]] = {}  # layer -> (name, role, rest) of its parameters
        for name in self.shapes:
            match = self.family.layer.fullmatch(name)
            if match is not None:
                stacks.setdefault(match.group(1), name)
                layers.setdefault(int(match.group(2)), []).append((name, self.family.role(match.group(3)),
                                                                   match.group(3)))
        if len(stacks) > 1:
            raise ValueError(f"the parameters are in {len(stacks)} stacks of layers ({', '.join(map(repr, stacks))}: "
                             "an encoder-decoder, or several towers), whose layer i would be summed into one; a heads "
                             "report describes one stack (pass from_config the shapes of one)")
        for name, shape in self.shapes.items():
            self.check(name, shape, "the model")
        for index in range(self.num_layers):
            named = layers.get(index, [])
            query = next((name for name, role, _ in named if role == QUERY), None)
            if query is None:
                raise ValueError(f"layer {index} has no attention query projection (like "
                                 f"{self.family.example.replace('<i>', str(index))}), but the config has "
                                 f"num_hidden_layers={self.num_layers}: the model has fewer layers than its config, "
                                 "or shares one layer's module between layers (named_parameters() lists it once)")
            outputs = [name for name, role, _ in named if role == OUTPUT]
            if len(outputs) != 1 or not any(role == KEY_VALUE for _, role, _ in named):
                others = [name for name, role, _ in named if role == OTHER]
                raise ValueError(f"{query!r}: layer {index}'s attention needs key/value projections and one output "
                                 f"projection ({self.family.outputs}), else its heads' columns would count as the "
                                 f"layer's other part; it has output projections {outputs}, other parameters {others}")
            unsplit = next((name for name, role, rest in named if role == OTHER and PROJECTION.fullmatch(rest)), None)
            if unsplit is not None:
                raise ValueError(f"{unsplit!r} is a projection of a second attention (a cross-attention?), which the "
                                 "layout does not split into heads: it knows one self-attention per layer")

    def layer_parameters(self) -> list[str]:
        """The names of the parameters inside the layers, in the model's order."""
        return [name for name in self.shapes if self.place(name) is not None]

    def head_sums(self, name: str, values: torch.Tensor) -> Optional[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(layer, per-head sums [num_heads], other sum)`` of a per-entry quantity of parameter ``name``
        (float64); None for a parameter outside the layers.

        Raises:
            ValueError: the model has no parameter ``name`` in the layers, or ``values`` is not of its shape.
        """
        place = self.place(name)
        if place is None:
            return None
        layer, role = place
        if tuple(values.shape) != self.expected_shape(name):
            raise ValueError(f"{name!r}: the values have shape {tuple(values.shape)}, expected {self.shapes[name]} "
                             "(the parameter's shape)")
        values = values.detach().to(torch.float64)
        if role == OTHER:
            return layer, values.new_zeros(self.num_heads), values.sum()
        if role == QUERY:
            heads = values.reshape(self.num_heads, -1).sum(1)
        elif role == KEY_VALUE:
            heads = values.reshape(self.num_kv_heads, -1).sum(1).repeat_interleave(self.group) / self.group
        else:
            heads = values.reshape(values.shape[0], self.num_heads, self.head_dim).sum((0, 2))
        return layer, heads, values.new_zeros(())

    def reduce(self, named_values: Iterable[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head ``[num_layers, num_heads]`` and per-layer ``other`` ``[num_layers]`` sums (float64, CPU)
        of per-entry quantities given by parameter name (each of the parameter's shape, else a ValueError)."""
        heads = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        other = torch.zeros(self.num_layers, dtype=torch.float64)
        for name, values in named_values:
            sums = self.head_sums(name, values)
            if sums is not None:
                layer, by_head, rest = sums
                heads[layer] += by_head.cpu()
                other[layer] += rest.cpu()
        return heads, other


def _family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """The family whose query projection some parameter name matches; a clear error for any other model."""
    for family in FAMILIES:
        for name in shapes:
            match = family.layer.fullmatch(name)
            if match is not None and family.query.fullmatch(match.group(3)):
                return family
    known = "; ".join(f"{f.label} ({f.example})" for f in FAMILIES)
    sample = ", ".join(repr(name) for name in list(shapes)[:3]) or "none"
    raise ValueError(f"unknown architecture: no parameter is named like an attention query projection of a "
                     f"{known}; the parameters are {sample}, ...")
