"""What the planner refuses before tracing: a method the optimizer refuses under FSDP2, settings of the
wrong type, and MoE experts outside bf16 (each refusal checked against what the real thing does)."""
import re

import pytest
import torch
import transformers

from childopt.memory import Setting, plan
from childopt.memory.models import Architecture
from tests.memory.configs import llama


def test_importance_under_fsdp2_is_refused_as_masked_adamw_refuses_it(tmp_path):
    """The oracle: MaskedAdamW(mask=Importance) over fully_shard-ed parameters (one gloo rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from childopt import Importance, MaskedAdamW

    if not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs gloo and no process group in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(8, 8)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(NotImplementedError, match="mask='importance' does not take sharded \\(DTensor\\)"):
            MaskedAdamW(list(model.named_parameters()), mask=Importance("running"), reserve_p=0.3)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="'importance' cannot be planned with world_size 2 .*sharded \\(DTensor\\)"):
        plan(llama(layers=2), "importance", Setting(batch_size=1, seq_len=8, world_size=2))


@pytest.mark.parametrize("field, value", [
    ("checkpointing", "no"), ("checkpointing", 1), ("reserve_p", True), ("reserve_p", "0.3"), ("dtype", ["fp32"]),
    ("autocast", None), ("mask_scope", 1),
])
def test_settings_of_the_wrong_type_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be .*got {re.escape(repr(value))}$"):
        Setting(**{field: value})


def _mixtral() -> Architecture:
    config = transformers.MixtralConfig(hidden_size=64, num_hidden_layers=2, vocab_size=500, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
                                        num_experts_per_tok=2)
    return Architecture(config, "causal-lm", "tiny Mixtral")


def test_moe_experts_in_fp32_are_refused_pointing_to_bf16_without_a_log_flood(capfd):
    arch = _mixtral()
    ids = torch.zeros(1, 16, dtype=torch.long)
    transformers.AutoModelForCausalLM.from_config(arch.config)(input_ids=ids, labels=ids).loss.backward()  # runs
    with pytest.raises(ValueError, match="mixtral's MoE experts run torch._grouped_mm.*--dtype bf16"):
        plan(arch, "full", Setting(batch_size=1, seq_len=16))
    assert "failed while attempting to run meta" not in capfd.readouterr().err  # refused before the trace
    bf16 = plan(arch, "full", Setting(batch_size=1, seq_len=16, dtype="bf16"))
    model = transformers.AutoModelForCausalLM.from_config(arch.config, dtype=torch.bfloat16)
    params = list(model.parameters())
    assert bf16.weights == sum(t.nbytes for t in params + list(model.buffers()))
    assert bf16.state == sum(2 * p.nbytes + 4 for p in params)  # torch AdamW: two bf16 moments, an fp32 step
