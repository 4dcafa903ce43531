"""LiveBytes on fake tensors against torch's profiler on real ones (an independent count of the
CPU allocator's events), and the fake-model plumbing it relies on."""
import pytest
import torch

from childopt.bench.live import cpu_peak_increase
from childopt.memory.models import build
from childopt.memory.planner import Setting, inputs_for
from childopt.memory.trace import LiveBytes, fake_mode, to_fake
from tests.memory.configs import SMALL


def _forward_backward(arch, model):
    inputs = inputs_for(arch, Setting(batch_size=4, seq_len=48))
    return lambda: model(**inputs).loss.backward(), list(inputs.values())


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_trace_peak_equals_profiled_peak_on_real_tensors(name, checkpointing):
    arch = SMALL[name]()
    peaks = []
    for fake in (False, True):
        torch.manual_seed(0)
        model = build(arch, torch.float32, "meta" if fake else "cpu")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if not fake:
            run, _ = _forward_backward(arch, model)
            peaks.append(cpu_peak_increase(run))
            continue
        mode = fake_mode()
        to_fake(model, mode)
        with mode:
            run, inputs = _forward_backward(arch, model)
        with mode, LiveBytes(list(model.parameters()) + list(model.buffers()) + inputs) as tracker:
            run()
        peaks.append(tracker.peak)
    if checkpointing:
        # Recomputation saves and restores the CPU RNG state (a 5 KB tensor the dispatcher does not
        # see) around each block, and frees its recomputed activations in a different order: 1%.
        assert peaks[1] == pytest.approx(peaks[0], rel=1e-2)
    else:
        assert peaks[1] == peaks[0]


def test_views_of_existing_tensors_allocate_nothing_and_frees_are_counted():
    mode = fake_mode()
    with mode:
        weight = torch.empty(256, 256)
    with mode, LiveBytes([weight]) as tracker:
        transposed = weight.t()  # a view of an existing storage
        assert tracker.live == 0
        product = transposed @ weight  # 256 x 256 fp32: 262144 bytes
        assert tracker.live == 256 * 256 * 4
        del product
        assert tracker.live == 0
    assert tracker.peak == 256 * 256 * 4
    assert transposed.shape == (256, 256)


def test_peak_gradients_are_the_marked_storages_live_at_the_peak():
    """Marked before the peak or after it (a backward op makes a gradient before its hook marks it),
    a gradient counts if it was live at the peak; one freed before it or made after it does not."""
    mode = fake_mode()
    with mode, LiveBytes() as tracker:
        early = torch.empty(10)  # 40 B, a gradient freed before the peak
        tracker.mark_gradient(early)
        del early
        kept = torch.empty(20)  # 80 B, marked before the peak
        tracker.mark_gradient(kept)
        made = torch.empty(30)  # 120 B, live at the peak, marked after it
        temporary = torch.empty(1000)  # the peak: 80 + 120 + 4000
        del temporary
        tracker.mark_gradient(made)
        tracker.mark_gradient(torch.empty(5))  # made after the peak
    assert tracker.peak == 4200 and tracker.peak_gradients == 200


def test_nonzero_of_a_declared_mask_and_of_its_copies_has_the_declared_length():
    mode = fake_mode()
    with mode, LiveBytes() as tracker:
        mask = torch.empty(10, 20, dtype=torch.bool)
        tracker.declare_kept(mask, 37)
        assert torch.nonzero(mask.reshape(-1)).shape == (37, 1)
        assert torch.nonzero(mask.clone()).shape == (37, 2)


def test_to_fake_keeps_shapes_dtypes_grad_flags_and_tied_weights():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    model[0].weight.requires_grad_(False)
    to_fake(model, fake_mode())
    assert model[1].weight is model[0].weight
    assert model[0].weight.device.type == "cpu" and model[0].weight.shape == (10, 4)
    assert not model[0].weight.requires_grad
