"""The methods' builders and the layouts the planner adds by hand."""
import pytest
import torch

from childopt.memory import METHODS, Setting, plan
from childopt.memory.methods import modeled_state_bytes, random_mask
from tests.memory.configs import SMALL


def test_8bit_state_follows_the_bitsandbytes_layout_by_hand():
    weight, bias = torch.empty(64, 100), torch.empty(64)  # 6400 >= 4096 elements: 8-bit; 64: fp32
    blocks = -(-6400 // 256)
    expected = (2 * 6400 + 2 * 4 * blocks) + 8 * 64 + 2 * 256 * 4
    assert modeled_state_bytes(METHODS["adamw-8bit"], [weight, bias]) == expected


def test_modeled_methods_differ_from_their_traced_stand_in_by_their_layout_only():
    arch, setting = SMALL["bert"](), Setting(batch_size=2, seq_len=16)
    ctf, importance = plan(arch, "ct-f", setting), plan(arch, "importance", setting)
    n = ctf.trainable
    assert importance.masks - ctf.masks == n  # one uint8 level code per element
    assert importance.state == ctf.state
    # A refresh step holds a 4-byte log ratio per element and one piece's temporaries (13 B per
    # element of the largest tensor, the 2000 x 64 word embeddings) on top of the step's own peak,
    # which the forward and backward may exceed.
    assert 0 < importance.activations - ctf.activations <= 4 * n + 13 * 2000 * 64
    assert importance.modeled and not ctf.modeled
    full, eight = plan(arch, "full", setting), plan(arch, "adamw-8bit", setting)
    assert eight.state < full.state / 3 and eight.gradients == full.gradients


def test_lora_trains_the_adapters_and_the_head_only():
    arch, setting = SMALL["bert"](), Setting(batch_size=2, seq_len=16)
    lora = plan(arch, "lora", setting)
    hidden, layers, rank = 64, 3, 8
    adapters = layers * 2 * (rank * hidden + hidden * rank)  # query and value: A (r x h) and B (h x r)
    classifier = hidden * 2 + 2
    assert lora.trainable == adapters + classifier


def test_random_mask_keeps_exactly_the_count():
    mask = random_mask(torch.empty(7, 9), 20)
    assert mask.shape == (7, 9) and mask.dtype == torch.bool and int(mask.sum()) == 20


@pytest.mark.cuda
def test_8bit_layout_matches_bitsandbytes_on_a_gpu():
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(64, 100, device="cuda")),
              torch.nn.Parameter(torch.randn(64, device="cuda"))]
    opt = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    held = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                held[value.untyped_storage()._cdata] = value.untyped_storage().nbytes()
    assert sum(held.values()) == modeled_state_bytes(METHODS["adamw-8bit"], params)
