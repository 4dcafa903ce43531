"""Tiny models with hand-countable heads for the analysis tests: a BERT of 2 layers, 2 heads of 4
(hidden 8), and a LLaMA of 2 layers with grouped-query attention (4 query heads, 2 key/value heads,
head_dim 3 set apart from hidden 8 / 4 so that it must come from the config); OPT, Phi and BART of
2 heads of 4 for the other names of the output projection and the refused layouts."""
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


def tiny_opt() -> transformers.OPTForSequenceClassification:
    """OPT: q/k/v_proj and out_proj, 2 layers of 2 heads of 4."""
    torch.manual_seed(0)
    return transformers.OPTForSequenceClassification(transformers.OPTConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=2, ffn_dim=16, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def tiny_phi() -> transformers.PhiForCausalLM:
    """Phi: q/k/v_proj and dense, 2 layers of 2 heads of 4 (with qk_layernorm, a LayerNorm per head_dim)."""
    torch.manual_seed(0)
    return transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, qk_layernorm=True))


def tiny_bart(model=transformers.BartForSequenceClassification, decoder_layers: int = 2):
    """BART, an encoder-decoder of 2 encoder layers; BartForCausalLM is its decoder alone, cross-attention included."""
    torch.manual_seed(0)
    return model(transformers.BartConfig(
        vocab_size=20, d_model=8, encoder_layers=2, decoder_layers=decoder_layers, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2))


def bert_name(layer: int, part: str) -> str:
    """``bert.encoder.layer.<layer>.<part>``, e.g. ``bert_name(1, "attention.self.query.weight")``."""
    return f"bert.encoder.layer.{layer}.{part}"


def zeros_like_params(model) -> dict:
    return {name: torch.zeros_like(p) for name, p in model.named_parameters()}
