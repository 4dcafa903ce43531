"""MaskedAdamW on DTensor shards (FSDP2's placement) at world sizes 1, 2 and 3, against one process.

The workers (tests/optim/sharded_worker.py) run under ``torchrun`` with gloo on CPU, each launch
under a timeout (tests.helpers.torchrun) so a hung collective fails instead of stalling CI.  Fed the same
averaged gradients, every scenario (no mask, fixed masks, Bernoulli masks, ChildTuning-D/-F,
amsgrad, capturable, a bf16 parameter) must leave parameters and moments bit-identical to the
same run on plain tensors in this process: the oracle.  A distributed checkpoint saved at world
size 2 resumes at 1 and 3 exactly as the uninterrupted run continues.
"""
import os
import re

import pytest
import torch

from childopt import backends
from tests.helpers import torchrun
from tests.optim import sharded_scenarios as scenarios

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
WORKER = os.path.join(os.path.dirname(__file__), "sharded_worker.py")


def _backends() -> list:
    native_ok, _ = backends.MODULES["native"].available(torch.device("cpu"))  # built here, not by 3 ranks at once
    return ["reference", "native"] if native_ok or os.environ.get("CHILDOPT_REQUIRE_NATIVE") == "1" else ["reference"]


def _launch(world: int, out: str, phase: str) -> dict:
    torchrun(world, WORKER, out, ",".join(_backends()), phase)
    return torch.load(os.path.join(out, f"ws{world}.pt"), weights_only=False)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded"))
    saved = _launch(2, out, "save")  # writes the checkpoints the other world sizes resume from
    return {1: _launch(1, out, "load"), 2: saved, 3: _launch(3, out, "load")}


def _assert_bit_identical(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{what}: {key}"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_scenario_steps_as_one_process_does(reports, world):
    results = reports[world]["results"]
    assert {name for name, _ in results} == set(scenarios.SCENARIOS)
    for (name, backend), got in results.items():
        _assert_bit_identical(got, scenarios.run(name, backend), f"{name} on {backend} at world size {world}")


@pytest.mark.parametrize("world", [2, 3])
def test_clip_grad_norm_measures_the_child_network_across_shards(reports, world):
    for (name, backend), got in reports[world]["clipped"].items():
        expected = scenarios.clipped(name, backend)
        what = f"{name} on {backend} at world size {world}"
        # torch's get_total_norm rounds each tensor's norm to its dtype: the bf16 parameter's norm is
        # rounded per shard instead of once, so totals (and the clip factor) agree to bf16's 2**-8.
        torch.testing.assert_close(got.pop("total"), expected.pop("total"), rtol=2**-8, atol=0, msg=what)
        for key, value in expected.items():
            rtol = 2**-7 if value.dtype == torch.bfloat16 else 2**-8  # and a bf16 gradient rounds once more
            torch.testing.assert_close(got[key], value, rtol=rtol, atol=1e-7, msg=f"{what}: {key}")


@pytest.mark.parametrize("world", [2, 3])
def test_a_one_process_state_dict_loads_into_shards(reports, world):
    """A full state dict (torch.save of one process): each rank keeps its rows of every moment."""
    loaded = reports[world]["from_plain"]
    assert loaded
    for (name, backend), got in loaded.items():
        expected = scenarios.run(name, backend, steps=scenarios.STEPS + 1)
        _assert_bit_identical(got, expected, f"{name} on {backend}, one process's state at {world} ranks")


@pytest.mark.parametrize("world", [1, 3])
def test_a_checkpoint_saved_at_two_ranks_resumes_at_another_world_size(reports, world):
    resumed = reports[world]["resumed"]
    assert resumed, "no checkpoint was resumed"
    for (name, backend), got in resumed.items():
        expected = scenarios.run(name, backend, steps=scenarios.STEPS + 1)
        _assert_bit_identical(got, expected, f"{name} on {backend}, saved at 2 ranks, resumed at {world}")


@pytest.mark.parametrize("world", [2, 3])
def test_a_gathered_sparse_state_dict_of_shards_is_the_one_process_state_dict(reports, world):
    """Sparse storage saves global indices and compact moments: gathered, they are one process's."""
    gathered = reports[world]["full_state"]
    assert gathered
    for backend, state in gathered.items():
        module, opt = scenarios.build("sparse-amsgrad", backend, lambda t: t.clone())
        scenarios.train(module, opt, lambda g: g)
        expected = opt.state_dict()["state"]
        for i, (name, _) in enumerate(module.named_parameters()):
            for key in ("indices", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                got = state[name][key]
                assert got.dtype == expected[i][key].dtype and torch.equal(got, expected[i][key]), (backend, name, key)


@pytest.mark.parametrize("world", [2, 3])
def test_sparse_state_dicts_move_shares_without_gathering_a_parameter(reports, world):
    """Only the counts' all-gathers and the shares' all-to-alls run: no DTensor op gathers a tensor."""
    assert set(reports[world]["sparse_round_trip_collectives"]) == {"c10d.allgather_", "c10d.alltoall_base_"}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_layer_and_tensor_selection_of_sharded_scores_is_the_one_process_mask(reports, world):
    """Histograms and tie counts summed over the ranks: the same exact count and tie order."""
    expected = scenarios.selections(lambda t: t.clone(), lambda t: t.clone())
    _assert_bit_identical(reports[world]["selections"], expected, f"selection at world size {world}")


@pytest.mark.parametrize("world", [1, 2])
def test_fisher_mask_of_an_fsdp2_model_is_the_one_process_mask(reports, world):
    """Scores accumulate on each rank's shards (clip norms reduced over them); at 2 ranks the
    averaged gradient of equal batches is exact, so the mask is bit-identical and the scores equal
    up to the order the clip norm sums the shards in (1e-6 relative), with across_ranks=True too
    (FSDP2's gradients are every rank's already: not summed again, nor divided by every rank's
    batch count)."""
    expected = scenarios.fisher_masks(lambda model: None, lambda t: t.clone())
    got = dict(reports[world]["fisher"])
    for key in [key for key in expected if key[0] == "scores"]:  # the clip norm sums the shards' squares in
        torch.testing.assert_close(got.pop(key), expected.pop(key), rtol=1e-6, atol=0)  # another order
    _assert_bit_identical(got, expected, f"fisher_mask at world size {world}")


@pytest.mark.parametrize("world", [1, 2])
def test_fisher_under_fsdp2_counts_passes_that_skip_a_scored_head(reports, world):
    """Passes are told apart by their backward, not by which parameters they reach; accumulate_loss,
    whose torch.autograd.grad gets no gradient for sharded parameters, refuses them."""
    expected = scenarios.fisher_passes(lambda model: None, lambda t: t.clone())
    got = reports[world]["fisher_passes"]
    assert got.pop("num_seen") == expected.pop("num_seen") == 3
    assert got.pop("accumulate_loss_refused") and not expected.pop("accumulate_loss_refused")
    _assert_bit_identical(got, expected, f"Fisher scores at world size {world}")


@pytest.mark.parametrize("world", [2, 3])
def test_the_ddp_child_network_hook_and_compact_all_reduce_match_the_dense_all_reduce(reports, world):
    """...and move only the child network's entries (reserve_p of the bytes)."""
    child, default = reports[world]["ddp"]["child"], reports[world]["ddp"]["default"]
    for run in (child, default):  # no divergence between replicas
        assert all(torch.equal(rank[key], run["ranks"][0][key]) for rank in run["ranks"] for key in rank)
    # Two ranks sum the same two values either way (bit-identical); three may be added in
    # another order by gloo's ring over a shorter buffer: equal up to fp32 rounding.
    tolerance = dict(rtol=0, atol=0) if world == 2 else dict(rtol=1e-6, atol=1e-9)
    for key, value in default["ranks"][0].items():
        torch.testing.assert_close(child["ranks"][0][key], value, **tolerance, msg=key)
    compact = reports[world]["ddp"]["compact"]  # sparse storage, compact gradients, all_reduce_gradients
    assert all(torch.equal(rank[key], compact["ranks"][0][key]) for rank in compact["ranks"] for key in rank)
    for key, value in default["ranks"][0].items():
        torch.testing.assert_close(compact["ranks"][0][key], value, **tolerance, msg=f"compact: {key}")
    sent, dense = child["bytes"]
    assert compact["bytes"] == sent  # the same entries: the child network's and the biases
    kept = sum(int(m.sum()) for m in child["masks"].values())
    unmasked = 40 + 3  # the biases have no mask: every entry is sent
    assert sent == 3 * 4 * (kept + unmasked)  # three steps of fp32 entries, no indices
    assert dense == 3 * 4 * (40 * 6 + 40 + 3 * 40 + 3)  # what DDP's default hook sends: every entry


@pytest.mark.parametrize("world", [2, 3])
def test_seed_none_takes_rank_zeros_seed(reports, world):
    seeds, alone = reports[world]["seeds"][:world], reports[world]["seeds"][world:]
    assert len(seeds) == world and len(set(seeds)) == 1
    assert alone == [99]  # stepped by rank 0 alone with sync_seed=False: no collective, its own seed


BAD_INPUTS = {
    "mask of the wrong global shape": ("ValueError", "has shape \\(5, 2\\), expected the parameter's shape \\(6, 2\\)"),
    "Shard(1) placement": ("ValueError", "placed as \\(Shard\\(dim=1\\),\\).*Shard\\(0\\)"),
    "plain gradient on a DTensor": ("TypeError", "is a DTensor but its gradient is a plain tensor"),
    "DTensor gradient on a plain parameter": ("TypeError", "is a plain tensor but its gradient is a DTensor"),
    "replicated gradient on a sharded parameter": ("ValueError", "its gradient as \\(Replicate\\(\\),\\)"),
    "seed differing between ranks": ("ValueError", "seed differs between ranks \\(rank 0: 5, rank 1: 6"),
    "ZeRO-style replaced params": ("RuntimeError", "DeepSpeed ZeRO.*FSDP2"),
    "compact gradients of a sharded parameter": ("NotImplementedError",
                                                 "compact_grads=True does not take DTensor .* reduce-scatter"),
    "sparse storage on a 2-D mesh": ("NotImplementedError", "storage='sparse' takes DTensor parameters on a 1-D "
                                                            "device mesh; .* 2-D mesh"),
    "saved sparse indices bad on the last rank only": ("ValueError", "saved 'indices' for .*: indices must be strictly "
                                                                     "increasing and inside \\[0, 24\\)"),
    "a saved second moment negative on the last rank only": ("ValueError", "saved 'exp_avg_sq' for .* negative or NaN"),
    "child-network hook on a Bernoulli mask": ("ValueError", "needs a fixed mask.*'bernoulli'"),
    "child-network hook on masks that differ between ranks": ("ValueError", "disagree on the child-network .* 'weight'"),
    "all_reduce_gradients with gradients on other parameters": ("ValueError",
                                                               "disagree on the gradient .* param_groups\\[0\\]"),
}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_the_same_clear_error_on_every_rank(reports, world, case):
    kind, pattern = BAD_INPUTS[case]
    errors = reports[world]["errors"][case]
    assert len(errors) == world
    for rank, error in enumerate(errors):
        assert error is not None, f"rank {rank} raised nothing for {case}"
        assert error[0] == kind and re.search(pattern, error[1]), f"rank {rank}: {error}"
