"""Training: the loop that turns the synthetic corpus into a small DeepSeek-V3-style model.

The idea
--------
Nothing here is MoE-specific except two lines, and that is the lesson: an MoE model trains
with the same loop as a dense one.

* Optimiser: AdamW (Loshchilov & Hutter 2019) -- Adam with decoupled weight decay, applied
  to matrices only (norm weights, biases and the router's selection bias are not decayed).
* Schedule: linear warmup for ``warmup_steps`` then cosine decay to ``min_lr``
  (DeepSeek-V3 §4.2 uses warmup + a constant phase + cosine decay; the toy is too short
  for the constant phase).
* Gradient accumulation: ``grad_accum`` micro-batches are summed (each loss divided by
  grad_accum) before one optimiser step; gradient clipping at ``grad_clip`` (V3 uses 1.0).
* Gradient checkpointing (``--grad-checkpointing``) recomputes each layer's activations
  in the backward pass instead of storing them.
* Mixed precision: ``--dtype bf16`` runs matmuls under ``torch.autocast`` with master
  weights and the optimiser in float32. ``ModelConfig.fp8`` (``minimoe train --fp8``) also
  runs the expert and attention-projection GEMMs in simulated FP8 (``minimoe.fp8``).

The two MoE lines:

1. the loss returned by the model already contains the balance losses that the config
   switches on (aux, seq_aux, z) and the MTP loss;
2. after each optimiser step ``model.update_expert_biases()`` applies DeepSeek-V3's
   auxiliary-loss-free update b_i += gamma * sign(mean load - load_i) -- outside autograd,
   because the bias is not learned by gradient descent.

Checkpoints are a folder: ``model.safetensors`` (weights and buffers, e.g. the expert
biases), ``config.json`` (the ModelConfig), ``optimizer.pt`` and ``train_state.json``.
They are written to a temporary folder and moved into place with one rename, so an
interrupted write never leaves a half checkpoint; ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from safetensors.torch import load_model, save_model

from minimoe import data as data_lib
from minimoe.config import ModelConfig
from minimoe.model import Transformer


@dataclass
class TrainArgs:
    preset: str = "toy"
    config_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change
    data: Optional[str] = None  # a UTF-8 text file instead of the synthetic corpus
    corpus_tokens: int = 2_000_000
    out_dir: str = "runs/toy"
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"  # "fp32" | "bf16"
    grad_checkpointing: bool = False
    resume: bool = False
    max_minutes: Optional[float] = None  # stop early (and save) when this budget is spent
    # MTP loss weight schedule (DeepSeek-V3 §4.2: lambda 0.3 for the first 10T tokens, then
    # 0.1): from step mtp_weight_switch_step on, the weight is mtp_loss_weight_after.
    # None = the config's mtp_loss_weight throughout.
    mtp_weight_switch_step: Optional[int] = None
    mtp_loss_weight_after: float = 0.1
    progress: bool = True
    save: bool = True
    compile: bool = False  # torch.compile the training forward (and so its backward)


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; anything else is taken as given."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def learning_rate(step: int, args: TrainArgs) -> float:
    """Linear warmup to args.lr, then cosine decay to args.min_lr at args.steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    progress = min(progress, 1.0)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def mtp_loss_weight(step: int, args: TrainArgs, base_weight: float) -> float:
    """lambda at a step: base_weight, then args.mtp_loss_weight_after from the switch step on."""
    if args.mtp_weight_switch_step is not None and step >= args.mtp_weight_switch_step:
        return args.mtp_loss_weight_after
    return base_weight


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def save_checkpoint(out_dir: str, model: Transformer, optimizer, step: int,
                    args: TrainArgs, history: list) -> None:
    """Write the checkpoint folder atomically (temporary folder + rename).

    optimizer None writes no optimizer.pt (a model to load, not a run to resume)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    save_model(model, os.path.join(tmp_dir, "model.safetensors"))
    with open(os.path.join(tmp_dir, "config.json"), "w") as handle:
        json.dump(model.cfg.to_dict(), handle, indent=2)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(tmp_dir, "optimizer.pt"))
    with open(os.path.join(tmp_dir, "train_state.json"), "w") as handle:
        json.dump({"step": step, "args": asdict(args), "history": history}, handle, indent=2)
    old_dir = out_dir.rstrip("/") + ".old"
    shutil.rmtree(old_dir, ignore_errors=True)
    if os.path.exists(out_dir):
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def load_checkpoint(out_dir: str, device: torch.device | str = "cpu") -> Transformer:
    """Rebuild a Transformer from a checkpoint folder written by save_checkpoint."""
    config_path = os.path.join(out_dir, "config.json")
    weights_path = os.path.join(out_dir, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint file missing: {path}")
    with open(config_path) as handle:
        cfg = ModelConfig.from_dict(json.load(handle))
    model = Transformer(cfg)  # cfg.fp8: FP8 layers, same parameter names
    missing, unexpected = load_model(model, weights_path, strict=True)
    return model.to(device)


@torch.no_grad()
def evaluate(model: Transformer, corpus, args: TrainArgs, device) -> float:
    """Mean main-model cross-entropy (nats per byte) over up to eval_batches fixed batches."""
    was_training = model.training
    model.eval()
    losses = []
    for index, (x, y, _) in enumerate(
        data_lib.iterate_eval_batches(corpus, args.batch_size, args.seq_len)
    ):
        if index >= args.eval_batches:
            break
        out = model(x.to(device), targets=y.to(device))
        losses.append(out.aux["losses"]["ce"].item())
    model.train(was_training)
    return sum(losses) / max(1, len(losses))


def mean_max_vio(router_stats: dict) -> float:
    """Average MaxVio over MoE layers (0 = perfectly balanced)."""
    values = [float(stats["max_vio"]) for stats in router_stats.values()]
    return sum(values) / len(values) if values else 0.0


def training_corpora(args):
    """(train, validation) corpora of a run: --data's text or the synthetic corpus, 95/5."""
    if args.dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {args.dtype!r}")
    if args.data is not None:
        corpus = data_lib.load_text_corpus(args.data)
    else:
        corpus = data_lib.build_corpus(args.corpus_tokens, seed=args.seed)
    return corpus.split(0.05)


def train(args: TrainArgs, on_step: Optional[Callable[[dict], None]] = None):
    """Train a model; returns (model, history, (train_corpus, val_corpus)).

    history is a list of dicts, one per optimiser step: step, lr, loss, ce, mtp, aux losses,
    max_vio (mean over layers), tokens_per_second and, on eval steps, val_loss.
    """
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train_corpus, val_corpus = training_corpora(args)

    start_step, history = 0, []
    checkpoint_exists = os.path.exists(os.path.join(args.out_dir, "model.safetensors"))
    if args.resume and checkpoint_exists:
        model = load_checkpoint(args.out_dir, device)
        with open(os.path.join(args.out_dir, "train_state.json")) as handle:
            state = json.load(handle)
        start_step, history = state["step"], state["history"]
    else:
        cfg = ModelConfig.preset(args.preset, **args.config_overrides)
        model = Transformer(cfg).to(device)  # cfg.fp8 converts the GEMMs to FP8 (minimoe.fp8)
    model.gradient_checkpointing = args.grad_checkpointing
    forward = torch.compile(model) if args.compile else model  # same parameters, compiled
    optimizer = make_optimizer(model, args)
    if args.resume and checkpoint_exists:
        optimizer.load_state_dict(
            torch.load(os.path.join(args.out_dir, "optimizer.pt"), map_location=device)
        )

    generator = torch.Generator().manual_seed(args.seed + start_step)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16")
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    progress = None
    if args.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=args.steps, initial=start_step, desc="train", unit="step")
    started = time.perf_counter()
    model.train()
    for step in range(start_step, args.steps):
        step_started = time.perf_counter()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.mtp_loss_weight = mtp_loss_weight(step, args, model.cfg.mtp_loss_weight)
        totals: dict = {}
        for _ in range(args.grad_accum):
            x, y, _ = data_lib.sample_batch(train_corpus, args.batch_size, args.seq_len, generator)
            with autocast:
                out = forward(x.to(device), targets=y.to(device))
            (out.loss / args.grad_accum).backward()
            for name, value in out.aux["losses"].items():
                value = value.detach() if torch.is_tensor(value) else value
                totals[name] = totals.get(name, 0.0) + float(value) / args.grad_accum
            totals["loss"] = totals.get("loss", 0.0) + out.loss.item() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_expert_biases()

        elapsed = time.perf_counter() - step_started
        record = {"step": step + 1, "lr": lr, "grad_norm": float(grad_norm),
                  "mtp_loss_weight": model.mtp_loss_weight,
                  "max_vio": mean_max_vio(out.aux["router"]),
                  "max_vio_by_layer": {name: float(stats["max_vio"])
                                       for name, stats in out.aux["router"].items()},
                  "tokens_per_second": tokens_per_step / elapsed, **totals}
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record["val_loss"] = evaluate(model, val_corpus, args, device)
        history.append(record)
        if on_step is not None:
            on_step(record)
        if progress is not None:
            postfix = {"loss": f"{record['ce']:.3f}", "tok/s": f"{record['tokens_per_second']:.0f}",
                       "maxvio": f"{record['max_vio']:.2f}"}
            if "mtp_ce_1" in record:
                postfix["mtp"] = f"{record['mtp_ce_1']:.3f}"
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.3f}"
            progress.set_postfix(postfix, refresh=False)
            progress.update(1)
        out_of_time = (args.max_minutes is not None
                       and time.perf_counter() - started > 60 * args.max_minutes)
        if out_of_time:
            if "val_loss" not in record:
                record["val_loss"] = evaluate(model, val_corpus, args, device)
            break
    if progress is not None:
        progress.close()
    if args.save:
        save_checkpoint(args.out_dir, model, optimizer, len(history), args, history)
    return model, history, (train_corpus, val_corpus)
