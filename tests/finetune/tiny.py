"""Tiny local Hugging Face models for the finetune checks that need a model folder but not a real one:
a word-level tokenizer over the words of the GLUE fixture and a 2-layer BERT or GPT-2, built in a second."""
import re
from pathlib import Path

import torch

from tests.finetune.smoke import FIXTURE

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIONS = 64


def _vocabulary() -> dict:
    text = " ".join(path.read_text().lower() for path in FIXTURE.glob("*/*.tsv"))
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    return {token: i for i, token in enumerate(SPECIALS + words)}


def save_tokenizer(directory: Path) -> None:
    """A lower-casing word-level tokenizer with BERT's special tokens (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocabulary()
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(directory)


def tiny_model(directory: Path, arch: str = "bert", *, tokenizer: bool = True, weights: bool = True) -> Path:
    """A 2-layer ``arch`` ("bert" or "gpt2") sequence classifier of :data:`POSITIONS` positions in ``directory``,
    with or without its tokenizer files and weights."""
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,
                              GPT2ForSequenceClassification)

    torch.manual_seed(0)
    size = len(_vocabulary())
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=POSITIONS))
    else:
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=size, n_embd=16, n_layer=2, n_head=2, n_positions=POSITIONS, pad_token_id=0))
    model.save_pretrained(directory)
    if not weights:
        for path in Path(directory).glob("*.safetensors"):
            path.unlink()
    if tokenizer:
        save_tokenizer(directory)
    return Path(directory)
