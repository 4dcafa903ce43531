"""The models the planner sizes: named presets or a local Hugging Face config, built without memory.

A preset is a transformers config written out here (the published config.json's sizes, so no
download is needed); a path is a config.json or a model directory holding one.  Encoders (model
types with a masked-LM head in transformers: BERT, RoBERTa, ...) are sized as sequence
classifiers, as in GLUE fine-tuning; every other model as a causal LM.  Models are built on the
meta device: every parameter's name, shape and dtype, and no bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

HEADS = ("classification", "causal-lm")
# Sizes a config.json must give (as such or under the model type's alias, e.g. GPT-2's n_head) where the
# model type has the field: transformers would fill in a default (LLaMA's 11008) for a missing one.
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads")
# Sizes checked to be positive ints wherever the config has them (None: the model derives them).
SIZE_FIELDS = REQUIRED_FIELDS + ("num_key_value_heads", "max_position_embeddings")

# name -> (model type, config fields, what it is).  Sizes from each model's published config.json.
PRESETS = {
    "minilm-l6": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, vocab_size=30522, max_position_embeddings=512),
                  "sentence-transformers/all-MiniLM-L6-v2 (22.7M; the GLUE table's model)"),
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                               vocab_size=30522, max_position_embeddings=512), "google-bert/bert-base-uncased (110M)"),
    "roberta-base": ("roberta", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=50265, max_position_embeddings=514,
                                     type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5),
                     "FacebookAI/roberta-base (125M)"),
    "llama-3b": ("llama", dict(hidden_size=3200, num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=8640, vocab_size=32000, max_position_embeddings=2048,
                               rms_norm_eps=1e-6, tie_word_embeddings=False), "openlm-research/open_llama_3b (3.4B)"),
    "llama-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                               rms_norm_eps=1e-5, tie_word_embeddings=False), "meta-llama/Llama-2-7b-hf (6.7B)"),
}


@dataclass(frozen=True)
class Architecture:
    """A transformers config, the head it is sized with, and where it came from."""

    config: object
    head: str
    source: str


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError("the memory planner builds models with transformers: pip install 'childopt[bench]'") \
            from exc
    return transformers


def _config_file(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model must be a preset ({', '.join(PRESETS)}), a config.json or a directory holding "
                         f"one; {model!r} is none of these")
    return path


def load_config(model: str):
    """The transformers config of a preset name or a local config.json / model directory."""
    transformers = _transformers()
    if model in PRESETS:
        model_type, fields, _ = PRESETS[model]
        return transformers.AutoConfig.for_model(model_type, **fields)
    path = _config_file(model)
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model: {path} is not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"model: {path} is not UTF-8 text ({exc})") from exc
    if not isinstance(fields, dict):
        raise ValueError(f"model: {path} holds a JSON {type(fields).__name__}, not an object of config fields")
    if "model_type" not in fields:
        raise ValueError(f"model: {path} has no 'model_type', so transformers cannot tell which model it describes")
    model_type = fields.pop("model_type")
    from huggingface_hub.errors import StrictDataclassError
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model: {path}: unknown model_type {model_type!r} (transformers "
                         f"{transformers.__version__} has no such model)")
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, StrictDataclassError) as exc:  # transformers' validation of the fields
        raise ValueError(f"model: {path}: {' '.join(str(exc).split())}") from exc  # on one line
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {config.model_type} is an encoder-decoder model; the planner sizes encoders "
                         "(classification) and decoders (causal-lm) only")
    _check_sizes(config, fields, path)
    return config


def _check_sizes(config, fields: dict, path: Path) -> None:
    """Refuse sizes missing from the file (checked in the file, not the config: transformers fills a
    missing size with its default), sizes that are not positive ints, and kv heads that do not divide
    the attention heads; each error names the file's field."""
    def field(name: str) -> str:
        alias = config.attribute_map.get(name)
        return alias if alias in fields else name

    present = [name for name in REQUIRED_FIELDS if getattr(config, name, None) is not None]
    missing = [name for name in present if name not in fields and config.attribute_map.get(name) not in fields]
    if missing:
        raise ValueError(f"model: {path} lacks {', '.join(missing)}, which the planner needs to size the model "
                         "(transformers would fill in its defaults)")
    for name in SIZE_FIELDS:
        value = getattr(config, name, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"model: {path}: {field(name)} must be a positive int, got {value!r}")
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(f"model: {path}: {field('num_attention_heads')} ({heads}) is not a multiple of "
                         f"num_key_value_heads ({kv_heads})")


def default_head(config) -> str:
    """``classification`` for encoders (a masked-LM model type), else ``causal-lm``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "classification" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal-lm"


def architecture(model: str, head: str = "auto") -> Architecture:
    """The :class:`Architecture` of ``model`` with ``head`` (``auto``: :func:`default_head`)."""
    if head != "auto" and head not in HEADS:
        raise ValueError(f"head must be 'auto' or one of {HEADS}, got {head!r}")
    config = load_config(model)
    source = PRESETS[model][2] if model in PRESETS else str(_config_file(model))
    return Architecture(config, default_head(config) if head == "auto" else head, source)


def build(arch: Architecture, dtype: torch.dtype, device: str = "meta") -> torch.nn.Module:
    """The model of ``arch`` with ``dtype`` parameters on ``device`` (meta: no memory), in training mode."""
    transformers = _transformers()
    auto = (transformers.AutoModelForSequenceClassification if arch.head == "classification"
            else transformers.AutoModelForCausalLM)
    with torch.device(device):
        model = auto.from_config(arch.config, dtype=dtype)
    return model.train()


def check_length(model: torch.nn.Module, config, seq_len: int, name: str = "seq_len") -> None:
    """Refuse sequences longer than a learned position table: an ``Embedding`` other than the word
    embedding with ``max_position_embeddings`` rows plus its ``offset`` (OPT, BioGPT: 2; rotary models
    have none), less RoBERTa's padding offset; the error names the length ``name`` (``--seq-len``)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    words = model.get_input_embeddings()
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m is not words
              and m.num_embeddings == limit + getattr(m, "offset", 0)]
    for table in tables:
        usable = limit - (table.padding_idx + 1 if table.padding_idx is not None else 0)
        if seq_len > usable:
            raise ValueError(f"{name} {seq_len} is longer than the model's learned position table "
                             f"({usable} positions)")


def layer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: its largest ``ModuleList`` (the FSDP units and
    the layers Child-Tuning masks)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
