"""Small architectures for the planner's tests: an encoder and a decoder (GQA) of each family."""
import transformers

from childopt.memory.models import Architecture
from childopt.memory.planner import Setting


def bert(layers: int = 3) -> Architecture:
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=2000, max_position_embeddings=128)
    return Architecture(config, "classification", "tiny BERT")


def roberta(layers: int = 2) -> Architecture:
    config = transformers.RobertaConfig(hidden_size=96, num_hidden_layers=layers, num_attention_heads=3,
                                        intermediate_size=192, vocab_size=3000, max_position_embeddings=130,
                                        type_vocab_size=1, pad_token_id=1)
    return Architecture(config, "classification", "tiny RoBERTa")


def llama(layers: int = 3) -> Architecture:
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=160, vocab_size=2000,
                                      max_position_embeddings=128)
    return Architecture(config, "causal-lm", "tiny LLaMA")


SMALL = {"bert": bert, "roberta": roberta, "llama": llama}

# The FSDP2 check (tests/memory/fsdp_worker.py): the 4-block LLaMA on 2 ranks, and on 4 ranks with a
# batch small enough that the gradients decide where the peak falls.
FSDP_SETTINGS = {2: Setting(batch_size=4, seq_len=48, world_size=2), 4: Setting(batch_size=1, seq_len=16, world_size=4)}
