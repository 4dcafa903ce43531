"""Tiny models with hand-countable heads for the analysis tests: a BERT of 2 layers, 2 heads of 4
(hidden 8), and a LLaMA of 2 layers with grouped-query attention (4 query heads, 2 key/value heads,
head_dim 3 set apart from hidden 8 / 4 so that it must come from the config)."""
import torch
import transformers

BERT_CONFIG = dict(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                   max_position_embeddings=16, num_labels=2)
LLAMA_CONFIG = dict(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=3, intermediate_size=16)


def tiny_bert(**overrides) -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**{**BERT_CONFIG, **overrides}))


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG))


def bert_name(layer: int, part: str) -> str:
    """``bert.encoder.layer.<layer>.<part>``, e.g. ``bert_name(1, "attention.self.query.weight")``."""
    return f"bert.encoder.layer.{layer}.{part}"


def zeros_like_params(model) -> dict:
    return {name: torch.zeros_like(p) for name, p in model.named_parameters()}
