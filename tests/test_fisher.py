"""FisherAccumulator, fisher_scores and fisher_mask against naive loops over the same batches."""
import re
from pathlib import Path

import pytest
import torch

from childopt import backends
from childopt.fisher import FisherAccumulator, fisher_mask, fisher_scores
from childopt.masks import select_mask
from tests.helpers import kernel_backend, torchrun


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer1 = torch.nn.Linear(5, 7)
        self.layer2 = torch.nn.Linear(7, 3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.layer2(torch.tanh(self.layer1(x)))))


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _batches(n=4, size=6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 5, generator=gen), torch.randint(0, 2, (size,), generator=gen)) for _ in range(n)]


def _plain_fisher(model, batches, loss_fn, clip=None):
    """sum over batches of (clipped grad)^2 / number of batches; no gradient counts as zero."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if "layer" in n}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for n, p in model.named_parameters():
            if n in total and p.grad is not None:
                g = p.grad if clip is None else p.grad * min(1.0, clip / (p.grad.norm().item() + 1e-6))
                total[n] += g * g
    model.zero_grad(set_to_none=True)
    return {n: t / len(batches) for n, t in total.items()}


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("free_grads", [False, True])
def test_batch_estimator_equals_a_naive_loop(lane, clip, free_grads):
    backend, device = lane
    model = _Net().to(device)
    batches = [tuple(t.to(device) for t in b) for b in _batches()]
    expected = _plain_fisher(model, batches, _loss, clip)
    with FisherAccumulator(model, include="layer", clip_norm=clip, free_grads=free_grads, backend=backend) as acc:
        for batch in batches:
            model.zero_grad()
            _loss(model, batch).backward()
            assert all((p.grad is None) == free_grads for n, p in model.named_parameters() if "layer" in n)
    scores = acc.scores()
    assert set(scores) == set(expected) and acc.counts == dict.fromkeys(expected, len(batches))
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-6, atol=1e-9)
    _loss(model, batches[0]).backward()  # hooks are gone after the with-block
    assert acc.counts == dict.fromkeys(expected, len(batches))


@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_hook_reads_each_gradient_once_without_clipping(clip, monkeypatch):
    """Without clip_norm or a GradScaler no norm is taken: the hook's only pass is the fused
    accumulation (12 B per element); with clipping there is one norm per tensor."""
    norms = []
    vector_norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: norms.append(1) or vector_norm(*a, **k))
    model = _Net()
    with FisherAccumulator(model, include="layer", clip_norm=clip, backend="reference"):
        for batch in _batches(n=2):
            model.zero_grad()
            _loss(model, batch).backward()
    scored = sum(1 for n, _ in model.named_parameters() if "layer" in n)
    assert len(norms) == (0 if clip is None else 2 * scored)


def _per_sample_fisher_sums(model, batches, clip=None):
    """sum over samples of (clipped grad)^2, each sample's own backward (a batch-size-one loop)."""
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        for i in range(x.shape[0]):
            model.zero_grad()
            _loss(model, (x[i:i + 1], y[i:i + 1])).backward()
            for n, p in model.named_parameters():
                g = p.grad if clip is None else p.grad * min(1.0, clip / (p.grad.norm().item() + 1e-6))
                expected[n] += g * g
    return expected


@pytest.mark.parametrize("clip", [None, 0.5])
def test_sample_estimator_equals_a_batch_size_one_loop(clip):
    model = _Net()
    batches = _batches(n=2, size=5)
    expected = _per_sample_fisher_sums(model, batches, clip)
    acc = FisherAccumulator(model, estimator="sample", clip_norm=clip, chunk_size=2)
    with acc:
        for batch in batches:
            acc.accumulate_samples(_loss, batch)
    scores = acc.scores()
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n] / 10, rtol=1e-5, atol=1e-8)
    assert acc.counts == dict.fromkeys(expected, 10)



class _BranchingNet(_Net):
    """Data-dependent control flow, as Hugging Face's attention-mask check: vmap cannot run it."""

    def forward(self, x):
        if bool((x > 0).all()):
            x = x * 2
        return super().forward(x)


def test_sample_estimator_of_a_model_vmap_cannot_run_takes_one_sample_at_a_time():
    model = _BranchingNet()
    batches = _batches(n=2, size=4)
    batches[0][0][1] = torch.rand(5) + 0.1  # one sample takes the branch
    expected = _per_sample_fisher_sums(model, batches)
    acc = FisherAccumulator(model, estimator="sample", chunk_size=2)
    with pytest.warns(UserWarning, match="cannot run under torch.func.vmap") as caught, acc:
        for batch in batches:
            acc.accumulate_samples(_loss, batch)
    (warning,) = [w for w in caught if "vmap" in str(w.message)]  # once, then the loop is remembered
    assert warning.filename == __file__
    for n, score in acc.scores().items():
        torch.testing.assert_close(score, expected[n] / 8, rtol=1e-5, atol=1e-8)
    assert acc.num_seen == 8


def test_a_mapping_batch_that_is_not_a_dict_is_scored_per_sample():
    """Hugging Face's collators yield BatchEncoding, a UserDict: vmap would find no tensors in it."""
    from collections import UserDict

    model = _Net()
    batches = _batches(n=2, size=3)
    expected = _per_sample_fisher_sums(model, batches)
    acc = FisherAccumulator(model, estimator="sample")
    with acc:
        for x, y in batches:
            acc.accumulate_samples(lambda m, b: _loss(m, (b["x"], b["y"])), UserDict(x=x, y=y))
    for n, score in acc.scores().items():
        torch.testing.assert_close(score, expected[n] / 6, rtol=1e-5, atol=1e-8)

def test_grad_scaler_scores_come_from_unscaled_gradients_and_overflows_are_skipped():
    model = _Net()
    batches = _batches(n=3)
    expected = _plain_fisher(model, batches, _loss)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with FisherAccumulator(model, include="layer", grad_scaler=scaler) as acc:
        for batch in batches:
            model.zero_grad()
            scaler.scale(_loss(model, batch)).backward()
        model.zero_grad()
        (_loss(model, batches[0]) * float("inf")).backward()  # an overflowed batch
    for n in expected:
        torch.testing.assert_close(acc.scores()[n], expected[n], rtol=1e-5, atol=1e-9)
    assert set(acc.counts.values()) == {3}


def test_a_tensor_that_overflows_in_some_batches_is_averaged_over_its_finite_ones():
    """GradScaler, partial overflow: ``b``'s gradient is inf in 2 of 4 batches while ``a``'s is
    finite; each score is the mean over the batches its tensor was scored in (hand-computed: 1)."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    with FisherAccumulator([("a", a), ("b", b)], grad_scaler=scaler, backend="reference") as acc:
        for batch in range(4):
            a.grad = b.grad = None
            factor = float("inf") if batch % 2 else 1.0
            (a.sum() + b.sum() * factor).backward()
    scores = acc.scores()
    torch.testing.assert_close(scores["a"], torch.ones(3))
    torch.testing.assert_close(scores["b"], torch.ones(2))
    assert acc.counts == {"a": 4, "b": 2} and acc.num_seen == 4


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_kernel_fisher_accumulate_matches_the_reference(kernel_lane, grad_dtype):
    """Within 1e-6: the kernels compute (g * c) * (g * c) + f without contraction; torch's CPU
    addcmul in the reference may fuse the multiply-add."""
    from childopt.backends import reference

    name, device = kernel_lane
    gen = torch.Generator().manual_seed(2)
    shapes = [(33, 7), (0,), (1025,), (3,)]
    grads = [torch.randn(s, generator=gen).to(device, grad_dtype) for s in shapes]
    scales = torch.tensor([1.0, 0.5, 0.25, 3.0], device=device)
    results = []
    for backend in (kernel_backend(name), reference.Backend()):
        fisher = [torch.full(s, 0.5, device=device) for s in shapes]
        for _ in range(2):
            backend.fisher_accumulate(fisher, grads, scales)
        results.append(fisher)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _bert_batches(n=3):
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 100, (4, 12), generator=gen), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=gen)} for _ in range(n)]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_fisher_mask_on_a_small_transformers_model_keeps_the_exact_count(scope):
    model = _tiny_bert()
    masks = fisher_mask(model, _bert_batches(), 0.25, scope=scope, progress=False)
    layered = {n: p for n, p in model.named_parameters() if "layer" in n}
    assert set(masks) == set(layered)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.25 * sum(p.numel() for p in layered.values()))
    assert all(p.grad is None for p in model.parameters())


def test_fisher_mask_keeps_the_largest_scores():
    model = _Net()
    batches = _batches()
    expected = _plain_fisher(model, batches, _loss, clip=1.0)
    masks = fisher_mask(model, batches, 0.3, loss_fn=_loss, progress=False)
    kept = torch.cat([expected[n][masks[n]] for n in masks])
    dropped = torch.cat([expected[n][~masks[n]] for n in masks])
    assert kept.min() >= dropped.max() * (1 - 1e-6)


def test_fisher_scores_are_the_naive_loops_and_what_fisher_mask_selects_from():
    model, batches = _Net(), _batches()
    expected = _plain_fisher(model, batches, _loss, clip=1.0)
    scores = fisher_scores(model, batches, loss_fn=_loss, progress=False)
    assert set(scores) == set(expected)
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-5, atol=1e-8)
    masks = fisher_mask(model, batches, 0.3, loss_fn=_loss, progress=False)
    assert all(torch.equal(masks[n], m) for n, m in select_mask(scores, 0.3).items())


@pytest.mark.parametrize("make,error,match", [
    (lambda: FisherAccumulator(_Net(), estimator="exact"), ValueError, "estimator must be one of"),
    (lambda: FisherAccumulator(_Net(), include="nothing-matches"), ValueError, "matches no trainable parameter"),
    (lambda: FisherAccumulator(list(_Net().named_parameters()), estimator="sample"), ValueError, "needs the nn.Module"),
    (lambda: FisherAccumulator(_Net(), clip_norm=0.0), ValueError, r"clip_norm \(or None\) must be in \(0.0, inf\]"),
    (lambda: FisherAccumulator(_Net(), clip_norm=True), TypeError, r"clip_norm \(or None\) must be a number, got bool"),
    (lambda: FisherAccumulator(_Net(), clip_norm="1.0"), TypeError, r"clip_norm \(or None\) must be a number, got str"),
    (lambda: FisherAccumulator(_Net(), free_grads="no"), TypeError, "free_grads must be a bool, got 'no'"),
    (lambda: FisherAccumulator(_Net(), include=3), TypeError, "include must be"),
    (lambda: FisherAccumulator(_Net()).accumulate_samples(_loss, _batches()[0]), RuntimeError, "needs estimator='sample'"),
])
def test_bad_input_raises_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


class _NeverIterated:
    """A dataloader that fails if anything reads a batch from it."""

    def __iter__(self):
        raise AssertionError("the Fisher pass started before its arguments were checked")


@pytest.mark.parametrize("args,error,match", [
    (dict(reserve_p=30), ValueError, r"reserve_p must be in \[0.0, 1.0\], got 30"),
    (dict(reserve_p="0.3"), TypeError, "reserve_p must be a number, got str"),
    (dict(reserve_p=0.3, scope="layers"), ValueError, "scope must be one of"),
])
def test_fisher_mask_checks_its_selection_before_the_fisher_pass(args, error, match):
    """A bad reserve_p or scope fails at once, not after every batch has run."""
    with pytest.raises(error, match=match):
        fisher_mask(_Net(), _NeverIterated(), loss_fn=_loss, progress=False, **args)


def test_float64_gradients_are_accumulated_by_the_reference_on_a_kernel_backend():
    """The native kernels take fp32/bf16/fp16 gradients; a float64 model's scores are routed to the
    reference op (it crashed in the native op before) and equal the reference backend's."""
    ok, why = backends.MODULES["native"].available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    scores = {}
    for name in ("native", "reference"):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).double()
        with FisherAccumulator(model, backend=name) as acc:
            model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
        scores[name] = acc.scores()
    for key, value in scores["reference"].items():
        assert torch.equal(scores["native"][key], value)


def test_float64_gradients_are_clipped_by_their_own_norm():
    """clip_norm on a float64 model (the norm was taken with dtype=float32, which torch refuses for
    float64): scores equal a float64 loop of clipped squares, to fp32 rounding of the stored scores."""
    torch.manual_seed(0)
    model = _Net().double()
    batches = [(x.double(), y) for x, y in _batches(n=3)]
    expected = _plain_fisher(model, batches, _loss, clip=0.5)
    scores = fisher_scores(model, batches, loss_fn=_loss, clip_norm=0.5, progress=False)
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n].float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_accumulate_loss_scores_what_backward_scores_without_touching_grad(clip):
    """Gradients taken with torch.autograd.grad (the path that keeps DDP's reducer out) score the
    same bits as the backward hooks, and no .grad is written."""
    model, batches = _Net(), _batches(n=3)
    with FisherAccumulator(model, include="layer", clip_norm=clip, free_grads=True) as hooked:
        for batch in batches:
            _loss(model, batch).backward()
    model.zero_grad(set_to_none=True)  # the head's, which the hooks did not score or free
    taken = FisherAccumulator(model, include="layer", clip_norm=clip)
    for batch in batches:
        taken.accumulate_loss(_loss(model, batch))
    assert all(p.grad is None for p in model.parameters())
    assert taken.num_seen == hooked.num_seen == 3
    for n, score in hooked.scores().items():
        assert torch.equal(taken.scores()[n], score), n


def test_accumulate_loss_refuses_what_it_cannot_take_apart():
    from torch.utils.checkpoint import checkpoint

    model, (x, y) = _Net(), _batches(n=1)[0]
    hidden = checkpoint(lambda t: torch.tanh(model.layer1(t)), x.requires_grad_(), use_reentrant=True)
    loss = torch.nn.functional.cross_entropy(model.head(torch.tanh(model.layer2(hidden))), y)
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing.*use_reentrant=False"):
        FisherAccumulator(model, include="layer").accumulate_loss(loss)
    with pytest.raises(RuntimeError, match="accumulate_loss needs estimator='batch'"):
        FisherAccumulator(model, estimator="sample").accumulate_loss(_loss(model, (x, y)))


# --- one divisor for every tensor: the number of batches ----------------------------------------

class _Routed(torch.nn.Module):
    """``layer_rare`` joins the forward only in batches that ask for it (a routed expert)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer_common = torch.nn.Linear(5, 4)
        self.layer_rare = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x, use_rare):
        hidden = self.layer_common(x)
        if use_rare:
            hidden = hidden + self.layer_rare(x)
        return self.head(torch.tanh(hidden))


def _routed_loss(model, batch):
    x, y, use_rare = batch
    return torch.nn.functional.cross_entropy(model(x, use_rare), y)


def _routed_batches(n=10, rare_at=(3,)):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 5, generator=gen), torch.randint(0, 2, (6,), generator=gen), i in rare_at)
            for i in range(n)]


@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_parameter_used_in_some_batches_is_divided_by_all_batches(clip):
    model, batches = _Routed(), _routed_batches()
    expected = _plain_fisher(model, batches, _routed_loss, clip)
    with FisherAccumulator(model, include="layer", clip_norm=clip, free_grads=True) as acc:
        for batch in batches:
            _routed_loss(model, batch).backward()
    assert acc.num_seen == 10
    assert acc.counts == {"layer_common.weight": 10, "layer_common.bias": 10,
                          "layer_rare.weight": 1, "layer_rare.bias": 1}
    scores = acc.scores()
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-6, atol=1e-9)


def test_fisher_mask_ranks_a_rarely_used_parameter_by_all_batches():
    model, batches = _Routed(), _routed_batches()
    expected = _plain_fisher(model, batches, _routed_loss, clip=1.0)
    masks = fisher_mask(model, batches, 0.3, loss_fn=_routed_loss, progress=False)
    kept = torch.cat([expected[n][masks[n]] for n in expected])
    dropped = torch.cat([expected[n][~masks[n]] for n in expected])
    assert kept.numel() == round(0.3 * 48) and kept.min() >= dropped.max() * (1 - 1e-6)
    # the data can tell: dividing layer_rare by its own single batch would rank it otherwise
    inflated = {n: s * (10 if "rare" in n else 1) for n, s in expected.items()}
    flat, flat_inflated = torch.cat([s.reshape(-1) for s in expected.values()]), \
        torch.cat([s.reshape(-1) for s in inflated.values()])
    assert not torch.equal(flat.topk(kept.numel()).indices.sort().values,
                           flat_inflated.topk(kept.numel()).indices.sort().values)


def test_num_batches_overrides_the_counted_passes_under_reentrant_checkpointing():
    """Reentrant checkpointing runs one nested backward per segment: two passes per batch here."""
    from torch.utils.checkpoint import checkpoint

    class Segmented(_Net):
        def forward(self, x):
            x = x.detach().requires_grad_()  # reentrant checkpointing passes no gradient otherwise
            h = checkpoint(lambda t: torch.tanh(self.layer1(t)), x, use_reentrant=True)
            h = checkpoint(lambda t: torch.tanh(self.layer2(t)), h, use_reentrant=True)
            return self.head(h)

    model, batches = Segmented(), _batches(n=3)
    expected = _plain_fisher(model, batches, _loss)
    with FisherAccumulator(model, include="layer", free_grads=True) as acc:
        for batch in batches:
            _loss(model, batch).backward()
    assert acc.num_seen == 6 and all(count == 3 for count in acc.counts.values())
    scores = acc.scores(num_batches=3)
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-6, atol=1e-9)


def test_an_empty_dataloader_or_no_gradient_is_an_error():
    model = _Routed()
    with pytest.raises(ValueError, match=r"dataloader yielded no batches \(max_batches=None\)"):
        fisher_mask(model, [], 0.3, loss_fn=_routed_loss, progress=False)
    with pytest.raises(ValueError, match="max_batches must be None or an int >= 1, got 0"):
        fisher_mask(model, _routed_batches(), 0.3, loss_fn=_routed_loss, max_batches=0, progress=False)
    with pytest.raises(ValueError, match=r"none of the 2 batches gave a gradient .*include='layer_rare'"):
        fisher_mask(model, _routed_batches(n=2, rare_at=()), 0.3, loss_fn=_routed_loss, include="layer_rare",
                    progress=False)
    with FisherAccumulator(model) as acc:
        pass
    with pytest.raises(RuntimeError, match="no gradients of the scored parameters were accumulated"):
        acc.scores()
    with pytest.raises(ValueError, match="num_batches must be an int >= 1, got 2.5"):
        acc.scores(num_batches=2.5)
    sample = FisherAccumulator(model, estimator="sample")
    with pytest.raises(ValueError, match="num_batches is for estimator='batch'"):
        sample.scores(num_batches=2)


@pytest.mark.parametrize("max_batches,expected", [(None, 3), (256, 3), (2, 2)])
def test_the_progress_bar_counts_the_batches_that_will_run(monkeypatch, max_batches, expected):
    import childopt.fisher

    totals = []
    real_tqdm = childopt.fisher.tqdm
    monkeypatch.setattr(childopt.fisher, "tqdm", lambda *a, **k: totals.append(k["total"]) or real_tqdm(*a, **k))
    fisher_scores(_Net(), _batches(n=3), loss_fn=_loss, max_batches=max_batches, progress=False)
    assert totals == [expected]
    fisher_scores(_Net(), iter(_batches(n=3)), loss_fn=_loss, max_batches=max_batches, progress=False)
    assert totals[1] == max_batches  # an iterator says no length: the bar counts to max_batches, if given


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_ddp_ranks_sum_their_scores_and_select_one_mask():
    """Each rank scores its own batches (3 and 4 of them): summed over the ranks, the scores are one
    process's over all of them (up to fp32 summation order, 1e-6 relative) and every rank selects
    the same mask.  The pass leaves DDP's reducer alone: training through the wrapper afterwards
    keeps the replicas equal (a static graph scored before its first step, a forward left without
    backward on one rank), the sample estimator runs on a model with a buffer, and a compiled DDP
    model is recognised."""
    out = torchrun(2, str(Path(__file__).with_name("fisher_ranks_worker.py")))
    worst = float(re.search(r"max relative difference (\S+)", out).group(1))
    assert worst <= 1e-6, out
    assert "masks equal on all 2 ranks: True" in out and "kept 17 of 58" in out
    assert "an unwrapped model with across_ranks=True scores alike: True" in out
    assert "an unwrapped model scored per rank warns: True" in out
    assert "replicas equal after training through the wrapper: True" in out
    assert "the sample estimator through DDP, with a buffer, scores alike: True" in out
    assert "static_graph scored before its first step, replicas equal after training: True" in out
    assert "a forward left without backward on one rank, replicas equal after training: True" in out
    assert "a compiled DDP model sums over the ranks and scores alike: True" in out


def test_across_ranks_needs_a_process_group():
    with pytest.raises(ValueError, match="across_ranks=True needs an initialized torch.distributed process group"):
        fisher_scores(_Net(), _batches(n=1), loss_fn=_loss, progress=False, across_ranks=True)
    with pytest.raises(TypeError, match="across_ranks must be None or a bool, got 'no'"):
        fisher_scores(_Net(), _batches(n=1), loss_fn=_loss, progress=False, across_ranks="no")
