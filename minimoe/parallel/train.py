"""Training with expert parallelism: ``torchrun --nproc-per-node 4 -m minimoe.parallel.train``.

The idea
--------
Expert parallelism is always combined with data parallelism over the same processes
(DeepSeek-V3 §3.2: 64-way EP across 8 nodes with ZeRO-1 data parallelism; torchtitan and
Megatron-LM build the EP group inside the data-parallel group). Here W processes:

* read the *same* global batch (same generator, same seed) and keep slice
  [rank*B/W, (rank+1)*B/W) of its sequences: data parallelism;
* hold identical copies of everything but the routed experts (attention, norms, embeddings,
  router, shared experts, MTP) and E / W experts per MoE layer
  (``minimoe.parallel.expert_parallel.to_expert_parallel``): expert parallelism.

One optimiser step, with L the loss of the whole batch = mean over ranks of each rank's
loss L_r (every rank holds B/W full sequences, so means of equal-sized parts average):

    backward(L_r / W)                                   on every rank
    replicated parameter p:   grad_p = sum_r dL_r/dp / W     one all-reduce (sum)
    expert parameter e:       grad_e arrives complete: the backward all-to-all already
                              brought every rank's contribution to e's owner
    ||g||^2 = sum over replicas (counted once) + all-reduce of the experts' squares
    clip by max_norm / (||g|| + 1e-6) as torch.nn.utils.clip_grad_norm_ does, AdamW step
    bias update with the load counters summed over ranks (ExpertParallelMoE)

AdamW is elementwise, so the sharded optimiser state is just the single-process state cut
along the expert axis. The losses therefore equal the single-process ``minimoe train``
losses on the same data and seed up to float round-off (the summation order differs); the
tests check it at 2 and 4 processes.

Checkpoint: the model and optimiser states are gathered to the single-process layout and
rank 0 writes the ordinary run folder with ``minimoe.train.save_checkpoint`` (one call,
in ``write_checkpoint``), so ``minimoe.train.load_checkpoint``, ``minimoe generate`` and
``minimoe train --resume`` read it like any other run.

Not supported here (the single-process trainer has them): bf16 autocast, gradient
checkpointing, resuming a parallel run, FP8 training. A batch must split evenly over ranks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from minimoe import data as data_lib
from minimoe import train as single
from minimoe.config import ModelConfig
from minimoe.model import Transformer
from minimoe.parallel.expert_parallel import (expert_parameter_names, gather_state_dict,
                                              pick_backend, to_expert_parallel)


def init_distributed() -> tuple[torch.device, int, int]:
    """Join the torchrun group (env://): NCCL + this rank's GPU when CUDA is there, else gloo + CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("minimoe.parallel.train runs under torchrun, e.g. "
                           "`torchrun --nproc-per-node 4 -m minimoe.parallel.train` "
                           "(RANK and WORLD_SIZE are not set)")
    backend, device = pick_backend()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device, dist.get_rank(), dist.get_world_size()


def sum_replicated_gradients(model: torch.nn.Module, sharded: set) -> None:
    """All-reduce (sum) the gradients of the parameters every rank holds a copy of."""
    for name, param in model.named_parameters():
        if name not in sharded and param.grad is not None:
            dist.all_reduce(param.grad)


def clip_gradients(model: torch.nn.Module, sharded: set, max_norm: float) -> float:
    """Global gradient norm (replicas once, experts from every rank), then clip in place.

    Same rule as torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""
    replicated_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grads.append(param.grad)
        square = param.grad.detach().double().pow(2).sum().cpu()
        if name in sharded:
            expert_sq += square
        else:
            replicated_sq += square
    device = grads[0].device if grads else torch.device("cpu")
    expert_sq = expert_sq.to(device)
    dist.all_reduce(expert_sq)
    norm = math.sqrt(float(replicated_sq) + float(expert_sq))
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return norm


def gather_model(model: torch.nn.Module, cfg: ModelConfig) -> Transformer:
    """A single-process Transformer with the expert-parallel model's weights (every rank calls)."""
    full = Transformer(cfg)
    full.load_state_dict(gather_state_dict(model), strict=True)
    return full


def gather_optimizer(model: torch.nn.Module, optimizer, full_model: Transformer, args):
    """The single-process AdamW of ``full_model`` with the sharded state gathered into it."""
    state = optimizer.state_dict()
    name_of = {id(param): name for name, param in model.named_parameters()}
    # state_dict numbers the parameters group after group, in the groups' order
    names = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    sharded = expert_parameter_names(model)
    world = dist.get_world_size()
    for index, name in enumerate(names):  # the same numbering in the single-process optimizer
        if name not in sharded or index not in state["state"]:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            local = state["state"][index][key].contiguous()  # (E/W, ., .)
            pieces = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(pieces, local)
            state["state"][index][key] = torch.cat(pieces)  # (E, ., .)
    full_optimizer = single.make_optimizer(full_model, args)
    full_optimizer.load_state_dict(state)
    return full_optimizer


def write_checkpoint(out_dir: str, model, optimizer, cfg, step: int, args, history: list) -> None:
    """Gather on every rank, write the single-process run folder on rank 0."""
    full_model = gather_model(model, cfg)
    full_optimizer = gather_optimizer(model, optimizer, full_model, args)
    if dist.get_rank() == 0:
        single.save_checkpoint(out_dir, full_model, full_optimizer, step, args, history)
    dist.barrier()


@torch.no_grad()
def evaluate(model, corpus, args, device, rank: int, world: int) -> float:
    """Mean validation cross-entropy over eval_batches batches, each split over the ranks."""
    model.eval()
    losses = []
    local = args.batch_size // world
    for index, (x, y, _) in enumerate(data_lib.iterate_eval_batches(corpus, args.batch_size,
                                                                    args.seq_len)):
        if index >= args.eval_batches:
            break
        if x.shape[0] != args.batch_size:  # a short last batch cannot be split evenly
            break
        rows = slice(rank * local, (rank + 1) * local)
        ce = model(x[rows].to(device), targets=y[rows].to(device)).aux["losses"]["ce"]
        dist.all_reduce(ce)
        losses.append(float(ce) / world)
    model.train()
    return sum(losses) / max(1, len(losses))


def train_step(model, optimizer, batches, args, sharded: set, rank: int, world: int) -> dict:
    """One optimiser step over ``args.grad_accum`` global batches; returns the step's record."""
    local = args.batch_size // world
    rows = slice(rank * local, (rank + 1) * local)
    totals: dict = {}
    for x, y in batches:
        out = model(x[rows], targets=y[rows])
        (out.loss / (args.grad_accum * world)).backward()
        named = {name: value.detach() for name, value in out.aux["losses"].items()}
        named["loss"] = out.loss.detach()
        for name, value in named.items():
            value = value.clone().reshape(())
            dist.all_reduce(value)  # mean over ranks = the whole batch's value
            totals[name] = totals.get(name, 0.0) + float(value) / (world * args.grad_accum)
    sum_replicated_gradients(model, sharded)
    totals["grad_norm"] = clip_gradients(model, sharded, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_expert_biases()  # ExpertParallelMoE sums the load counters over ranks first
    return totals


def train_parallel(args: single.TrainArgs, on_step: Optional[Callable[[dict], None]] = None):
    """Expert-parallel + data-parallel training of ``args``; returns (model, history).

    Call on every rank of an initialised default process group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if args.batch_size % world != 0:
        raise ValueError(f"--batch-size {args.batch_size} must split evenly over {world} ranks")
    torch.manual_seed(args.seed)  # as minimoe.train.train: the same initial weights everywhere
    train_corpus, val_corpus = single.training_corpora(args)
    cfg = ModelConfig.preset(args.preset, **args.config_overrides)
    model = to_expert_parallel(Transformer(cfg)).to(device)
    sharded = expert_parameter_names(model)
    optimizer = single.make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)  # same stream as the single process
    history: list = []
    model.train()
    for step in range(args.steps):
        started = time.perf_counter()
        lr = single.learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.mtp_loss_weight = single.mtp_loss_weight(step, args, cfg.mtp_loss_weight)
        batches = []
        for _ in range(args.grad_accum):
            x, y, _ = data_lib.sample_batch(train_corpus, args.batch_size, args.seq_len, generator)
            batches.append((x.to(device), y.to(device)))
        record = {"step": step + 1, "lr": lr,
                  **train_step(model, optimizer, batches, args, sharded, rank, world)}
        elapsed = time.perf_counter() - started
        record["tokens_per_second"] = args.batch_size * args.seq_len * args.grad_accum / elapsed
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record["val_loss"] = evaluate(model, val_corpus, args, device, rank, world)
        history.append(record)
        if on_step is not None:
            on_step(record)
    if args.save:
        write_checkpoint(args.out_dir, model, optimizer, cfg, len(history), args, history)
    return model, history


def parse_args(argv=None) -> tuple[single.TrainArgs, int]:
    from minimoe.cli import parse_override

    defaults = single.TrainArgs()
    parser = argparse.ArgumentParser(description="Expert-parallel training of a minimoe preset "
                                     "(run under torchrun).")
    parser.add_argument("--preset", default=defaults.preset)
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="FIELD=VALUE", help="ModelConfig override")
    parser.add_argument("--data", default=None, help="a UTF-8 text file instead of the "
                        "synthetic corpus")
    parser.add_argument("--corpus-tokens", type=int, default=defaults.corpus_tokens)
    parser.add_argument("--out", dest="out_dir", default="runs/toy-ep")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--min-lr", type=float, default=defaults.min_lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--eval-every", type=int, default=0, help="0 = no validation")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--no-save", action="store_true", help="write no checkpoint")
    options = parser.parse_args(argv)
    args = single.TrainArgs(
        preset=options.preset, config_overrides=dict(options.overrides), data=options.data,
        corpus_tokens=options.corpus_tokens, out_dir=options.out_dir, steps=options.steps,
        batch_size=options.batch_size, seq_len=options.seq_len, grad_accum=options.grad_accum,
        lr=options.lr, min_lr=options.min_lr, warmup_steps=options.warmup_steps,
        eval_every=options.eval_every, seed=options.seed, progress=False,
        save=not options.no_save)
    return args, options.log_every


def main(argv=None) -> int:
    args, log_every = parse_args(argv)
    device, rank, world = init_distributed()
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    def log(record: dict) -> None:
        if rank == 0 and (record["step"] % log_every == 0 or record["step"] in (1, args.steps)):
            extra = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
            print(f"step {record['step']:4d}  loss {record['loss']:.6f}  ce {record['ce']:.4f}  "
                  f"grad norm {record['grad_norm']:.4f}  {record['tokens_per_second']:.0f} tok/s"
                  + extra, flush=True)

    try:
        if rank == 0:
            print(f"expert parallelism over {world} processes ({dist.get_backend()}, {device.type}); "
                  f"preset {args.preset}, global batch {args.batch_size} x {args.seq_len}", flush=True)
        train_parallel(args, on_step=log)
        if rank == 0 and args.save:
            print(f"checkpoint (single-process layout): {args.out_dir}", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
