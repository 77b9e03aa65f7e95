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

Checkpoints and run folders (``minimoe.run_folder``): weights, config, optimiser and RNG state
as safetensors + JSON (no pickle), written atomically every ``save_every_minutes`` (and every
``save_every`` steps), on Ctrl-C / SIGTERM and at the end; ``--resume`` continues a run
exactly where its last complete checkpoint left it (same data order, same schedule).

The learning-rate schedule under a time budget
----------------------------------------------
A cosine schedule must know where it ends. With ``max_minutes`` set, the loop measures its
own speed over the first ``PLAN_AFTER_STEPS`` steps (still inside the warmup, whose
learning rate does not depend on the end) and then *plans* the run: the schedule ends at the
last step that fits the budget on this machine, at most ``steps``. A fast machine trains the
steps asked for; a slow or busy one trains fewer, with a finished schedule -- a run cut off
half-way down its cosine is worse than a shorter complete one. We chose a planned step count
over a schedule defined in wall-clock time because it keeps the run reproducible: the plan
is saved, and a resumed run follows the same schedule step for step. If the machine slows
down after the plan, the budget still stops the run, and the last line says so. Resuming a
run whose planned schedule is complete, towards more steps, re-plans over the new total: the
learning rate rises again to the longer cosine's value at that step.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional

import torch
from safetensors.torch import load_model

from minimoe import data as data_lib
from minimoe import run_folder
from minimoe.config import PRESETS, ModelConfig
from minimoe.model import Transformer

PLAN_AFTER_STEPS = 20  # steps measured before a time-limited run plans its schedule
PLAN_MARGIN = 0.95  # share of the remaining budget the plan fills (evaluations, saves)


@dataclass
class TrainArgs:
    preset: str = "toy"
    config_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change
    data: Optional[str] = None  # a UTF-8 text file instead of the synthetic corpus
    corpus_tokens: int = 2_000_000
    out_dir: Optional[str] = None  # None: runs/<preset>[-<data file stem>]
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
    overwrite: bool = False  # replace an existing run folder (never done unless asked)
    max_minutes: Optional[float] = None  # plan the schedule to fit, stop (and save) at the limit
    save_every: int = 0  # also save every N steps (0: by time only)
    save_every_minutes: float = 1.0  # save at least this often (a kill loses at most this)
    # MTP loss weight schedule (DeepSeek-V3 §4.2: lambda 0.3 for the first 10T tokens, then
    # 0.1): from step mtp_weight_switch_step on, the weight is mtp_loss_weight_after.
    # None = the config's mtp_loss_weight throughout.
    mtp_weight_switch_step: Optional[int] = None
    mtp_loss_weight_after: float = 0.1
    progress: bool = True
    save: bool = True
    # torch.compile the training forward (and so its backward). Off by default: on 2 CPU
    # cores the toy's step gets ~1.3x faster, but compiling takes ~90 s on a cold cache, more
    # than that saves in the 4-minute main job (notebooks/results/vs_transformers.md)
    compile: bool = False


# The settings that define a run: --resume with a different value would silently train a
# different model or data than the one saved. (field -> the command-line flag)
RUN_DEFINING = {"preset": "--preset", "config_overrides": "--set", "data": "--data",
                "corpus_tokens": "corpus_tokens", "seed": "--seed", "batch_size": "--batch-size",
                "seq_len": "--seq-len", "grad_accum": "--grad-accum"}


def default_out_dir(preset: str, data: Optional[str] = None,
                    overrides: Optional[dict] = None) -> str:
    """runs/<preset>[-<data file stem>][-<field>=<value>...]: a run with another preset, data
    or --set gets its own folder (``runs/toy-classic``, ``runs/toy-my``,
    ``runs/toy-aux_loss_alpha=0.01``), so it never meets the main job's ``runs/toy``."""
    parts = [preset]
    if data is not None:
        parts.append(os.path.splitext(os.path.basename(data))[0])
    parts += [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
              for key, value in sorted((overrides or {}).items())]
    return os.path.join("runs", "-".join(parts))


# ----------------------------------------------------------------------------------------------
# Checking every argument before any work starts
# ----------------------------------------------------------------------------------------------
def check_config(preset: str, overrides: dict) -> ModelConfig:
    """The ModelConfig of preset + --set overrides; errors name --set and the field."""
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    for name in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"--set {name}=...: ModelConfig has no field {name!r}{hint}")
    try:
        return ModelConfig.preset(preset, **overrides)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--set {overrides}: {error}") from error


def _check_numbers(args: TrainArgs) -> None:
    positive = {"--steps": args.steps, "--batch-size": args.batch_size, "--seq-len": args.seq_len,
                "--grad-accum": args.grad_accum, "corpus_tokens": args.corpus_tokens,
                "eval_batches": args.eval_batches}
    for flag, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be a whole number >= 1, got {value!r}")
    at_least_zero = {"--warmup-steps": args.warmup_steps, "--eval-every": args.eval_every,
                     "--save-every": args.save_every, "--min-lr": args.min_lr,
                     "--save-every-minutes": args.save_every_minutes,
                     "--max-minutes": args.max_minutes or 0, "--grad-clip": args.grad_clip}
    for flag, value in at_least_zero.items():
        if not value >= 0:
            raise ValueError(f"{flag} must be >= 0, got {value!r}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr!r}")
    if args.dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be 'fp32' or 'bf16', got {args.dtype!r}")


def _check_data(args: TrainArgs) -> None:
    """--data exists and is long enough for one validation and one training window."""
    if args.data is None:
        tokens, source = args.corpus_tokens, "corpus_tokens"
    else:
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data: no text file at {args.data!r}")
        tokens, source = os.path.getsize(args.data), f"--data {args.data}"
    data_lib.check_corpus_size(tokens, args.seq_len, VAL_FRACTION, source)


def _check_resume(args: TrainArgs) -> None:
    """--resume of a missing folder, or with settings that contradict the saved run: errors."""
    if run_folder.recover(args.out_dir) is None or not run_folder.is_complete(args.out_dir):
        raise FileNotFoundError(f"--resume: no run to resume in {args.out_dir!r} (check --out; "
                                "leave out --resume to start a new run there)")
    state = run_folder.read_state(args.out_dir)
    saved, differ = state.get("args", {}), []
    for name, flag in RUN_DEFINING.items():
        if name in saved and name != "config_overrides" and saved[name] != getattr(args, name):
            differ.append(f"{flag} {saved[name]!r} (saved) vs {getattr(args, name)!r}")
    if not differ:
        try:
            cfg = check_config(args.preset, args.config_overrides)
        except ValueError as error:
            raise ValueError(f"--resume with these settings: {error}") from error
        saved_cfg = run_folder.read_config(args.out_dir)
        changed = {k: (v, getattr(cfg, k)) for k, v in saved_cfg.items()
                   if k != "name" and getattr(cfg, k, v) != v}
        if changed:
            differ.append("--preset/--set/--fp8 change the model: " + ", ".join(
                f"{k} {old!r} (saved) vs {new!r}" for k, (old, new) in sorted(changed.items())))
    if differ:
        raise ValueError(f"--resume: these settings contradict the run saved in "
                         f"{args.out_dir!r}: " + "; ".join(differ) + ". Leave them out to "
                         "continue the saved run, or train a new run with another --out")
    if state["step"] >= args.steps:
        raise ValueError(f"--steps {args.steps}: the run in {args.out_dir!r} is already at step "
                         f"{state['step']}; give a larger --steps to continue it")


def validate_args(args: TrainArgs) -> ModelConfig:
    """Check every argument (numbers, preset and --set, data size, the run folder) before any
    work starts; returns the ModelConfig of a new run. Errors name the flag."""
    _check_numbers(args)
    if args.out_dir is None:
        args.out_dir = default_out_dir(args.preset, args.data, args.config_overrides)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                         "choose one")
    if args.resume:
        _check_resume(args)
    cfg = check_config(args.preset, args.config_overrides)
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    _check_data(args)
    if args.save and run_folder.is_foreign(args.out_dir):
        raise FileExistsError(f"--out {args.out_dir!r} is a folder with other files, not a "
                              "minimoe run folder: a save would replace them; choose another "
                              "--out")
    if not args.resume and args.save and run_folder.holds_run(args.out_dir) and not args.overwrite:
        raise FileExistsError(f"--out {args.out_dir!r} already holds a training run: "
                              "--resume continues it, --overwrite replaces it (at the first "
                              "save), or choose another --out")
    return cfg


# ----------------------------------------------------------------------------------------------
# Optimiser, schedule, checkpoints
# ----------------------------------------------------------------------------------------------
def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; anything else is taken as given."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def learning_rate(step: int, args: TrainArgs, total_steps: Optional[int] = None) -> float:
    """Linear warmup to args.lr, then cosine decay to args.min_lr at total_steps (the planned
    end of the schedule; default args.steps)."""
    total = args.steps if total_steps is None else total_steps
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    progress = min(progress, 1.0)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def mtp_loss_weight(step: int, args: TrainArgs, base_weight: float) -> float:
    """lambda at a step: base_weight, then args.mtp_loss_weight_after from the switch step on."""
    if args.mtp_weight_switch_step is not None and step >= args.mtp_weight_switch_step:
        return args.mtp_loss_weight_after
    return base_weight


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) runs


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only.

    PyTorch's fused implementation where every parameter's device has one (CPU and CUDA):
    the same update, in one kernel per step instead of a dozen foreach ops (on the toy,
    1.6 instead of 7 ms a step on 2 CPU cores). transformers' Trainer picks the same
    ("adamw_torch_fused") on torch >= 2.8."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in FUSED_ADAMW_DEVICES for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def save_checkpoint(out_dir: str, model: Transformer, optimizer, step: int,
                    args: TrainArgs, history: list, generator: Optional[torch.Generator] = None,
                    **state) -> None:
    """Write the run folder atomically (minimoe.run_folder): weights, config, the byte
    tokenizer, train_state.json ("step", "history", "args", ...) and, for a run to resume,
    the optimiser and generator states. optimizer None: a model to load (merged LoRA)."""
    from minimoe.checkpoints.tokenizer import BYTE_TOKENIZER_FILE, byte_tokenizer_json

    extra = {BYTE_TOKENIZER_FILE: byte_tokenizer_json()} if model.cfg.vocab_size == 256 else {}
    run_folder.save(out_dir, model, {"step": step, "args": asdict(args), "history": history,
                                     **state},
                    optimizer=optimizer, generators={"data": generator} if generator else None,
                    extra_files=extra)


def load_checkpoint(out_dir: str, device: torch.device | str = "cpu") -> Transformer:
    """Rebuild a Transformer from a run folder written by save_checkpoint."""
    return run_folder.load_model(out_dir, device)


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


VAL_FRACTION = 0.05


def training_corpora(args):
    """(train, validation) corpora of a run: --data's text or the synthetic corpus, 95/5."""
    if args.dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be 'fp32' or 'bf16', got {args.dtype!r}")
    if args.data is not None:
        corpus = data_lib.load_text_corpus(args.data)
    else:
        corpus = data_lib.build_corpus(args.corpus_tokens, seed=args.seed)
    return corpus.split(VAL_FRACTION)


# ----------------------------------------------------------------------------------------------
# One optimiser step (shared by train and minimoe.lora.finetune)
# ----------------------------------------------------------------------------------------------
def training_step(model, optimizer, parameters, corpus, generator, args, device, autocast):
    """grad_accum micro-batches (each loss / grad_accum), clip, one AdamW step.

    Returns (totals, grad_norm, out): totals averages "loss" and every named loss over the
    micro-batches; out is the last micro-batch's model output (router statistics)."""
    totals: dict = {}
    for _ in range(args.grad_accum):
        x, y, _ = data_lib.sample_batch(corpus, args.batch_size, args.seq_len, generator)
        with autocast:
            out = model(x.to(device), targets=y.to(device))  # (B, T) ids -> loss
        (out.loss / args.grad_accum).backward()
        for name, value in out.aux["losses"].items():
            value = value.detach() if torch.is_tensor(value) else value
            totals[name] = totals.get(name, 0.0) + float(value) / args.grad_accum
        totals["loss"] = totals.get("loss", 0.0) + out.loss.item() / args.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, float(grad_norm), out


class StopRequests:
    """While active, Ctrl-C (SIGINT) and SIGTERM ask the loop to save and stop after the
    current step instead of killing it; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name

    def __enter__(self) -> "StopRequests":
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar (steps done, rate and the estimated time left), or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def say(message: str) -> None:
    """Print a line without breaking a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: Transformer
    history: list
    corpora: tuple  # (train, validation)
    stopped: str  # "finished", "time limit", "SIGINT" or "SIGTERM"
    schedule_steps: int  # where the learning-rate schedule ends (planned under max_minutes)
    minutes: float  # wall-clock minutes of this session's loop


def train(args: TrainArgs, on_step: Optional[Callable[[dict], None]] = None):
    """Train a model; returns (model, history, (train_corpus, val_corpus)).

    history is a list of dicts, one per optimiser step: step, lr, loss, ce, mtp, aux losses,
    max_vio (mean over layers), tokens_per_second and, on eval steps, val_loss.
    """
    result = run_training(args, on_step)
    return result.model, result.history, result.corpora


def _start(args: TrainArgs, cfg: ModelConfig, device):
    """(model, optimizer, generator, history, schedule_steps, plan_pending): a new run, or
    the resumed one exactly as saved (weights, AdamW moments, data order, schedule)."""
    generator = torch.Generator().manual_seed(args.seed)
    if not args.resume:
        model = Transformer(cfg).to(device)  # cfg.fp8 converts the GEMMs to FP8 (minimoe.fp8)
        return (model, make_optimizer(model, args), generator, [], args.steps,
                args.max_minutes is not None)
    model = load_checkpoint(args.out_dir, device)
    optimizer = make_optimizer(model, args)
    run_folder.load_training_state(args.out_dir, model, optimizer, {"data": generator})
    state = run_folder.read_state(args.out_dir)
    inherited = (state["step"] < state.get("schedule_steps", 0)
                 and state.get("requested_steps") == args.steps)
    if inherited:  # a killed or stopped run: the same schedule, step for step
        return model, optimizer, generator, state["history"], state["schedule_steps"], False
    return (model, optimizer, generator, state["history"], args.steps,
            args.max_minutes is not None)


def _plan(step: int, schedule_steps: int, seconds_per_step: float, elapsed: float,
          args: TrainArgs) -> int:
    """The last step that fits the time budget (module docstring), at most schedule_steps."""
    remaining = 60 * args.max_minutes - elapsed
    fit = step + int(PLAN_MARGIN * remaining / max(seconds_per_step, 1e-9))
    return max(step + 1, min(schedule_steps, fit))


def _announce_plan(step: int, schedule_steps: int, probe_seconds: float, elapsed: float,
                   args: TrainArgs, progress) -> int:
    """_plan from the measured speed; says so when it shortens the schedule."""
    seconds_per_step = probe_seconds / PLAN_AFTER_STEPS
    planned = _plan(step, schedule_steps, seconds_per_step, elapsed, args)
    if planned < schedule_steps:
        say(f"planned {planned} of the {schedule_steps} steps asked for, to fit --max-minutes "
            f"{args.max_minutes:g} on this machine ({seconds_per_step:.2f} s/step); the "
            f"learning-rate schedule ends at step {planned}")
        if progress is not None:
            progress.total = planned
    return planned


def _record(step, lr, totals, grad_norm, out, model, elapsed, args) -> dict:
    return {"step": step + 1, "lr": lr, "grad_norm": grad_norm,
            "mtp_loss_weight": model.mtp_loss_weight,
            "max_vio": mean_max_vio(out.aux["router"]),
            "max_vio_by_layer": {name: float(stats["max_vio"])
                                 for name, stats in out.aux["router"].items()},
            "tokens_per_second": args.batch_size * args.seq_len * args.grad_accum / elapsed,
            **totals}


def _postfix(record: dict) -> dict:
    postfix = {"loss": f"{record['ce']:.3f}", "tok/s": f"{record['tokens_per_second']:.0f}",
               "maxvio": f"{record['max_vio']:.2f}"}
    if "mtp_ce_1" in record:
        postfix["mtp"] = f"{record['mtp_ce_1']:.3f}"
    if "val_loss" in record:
        postfix["val"] = f"{record['val_loss']:.3f}"
    return postfix


def run_training(args: TrainArgs, on_step: Optional[Callable[[dict], None]] = None
                 ) -> TrainResult:
    """train() with the outcome: why the loop stopped and where the schedule ended."""
    cfg = validate_args(args)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train_corpus, val_corpus = training_corpora(args)
    model, optimizer, generator, history, schedule_steps, plan_pending = _start(args, cfg, device)
    model.gradient_checkpointing = args.grad_checkpointing
    forward = torch.compile(model) if args.compile else model  # the same parameters, compiled
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16")
    start_step = step = len(history)

    def save() -> None:
        if args.save:
            save_checkpoint(args.out_dir, model, optimizer, step, args, history, generator,
                            schedule_steps=schedule_steps, requested_steps=args.steps)

    progress = progress_bar(schedule_steps, start_step, "train", args.progress)
    started = last_save = time.perf_counter()
    stopped, probe_started = "finished", None
    model.train()
    with StopRequests() as requests:
        while step < schedule_steps:
            step_started = time.perf_counter()
            lr = learning_rate(step, args, schedule_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.mtp_loss_weight = mtp_loss_weight(step, args, model.cfg.mtp_loss_weight)
            totals, grad_norm, out = training_step(forward, optimizer, model.parameters(),
                                                   train_corpus, generator, args, device,
                                                   autocast)
            model.update_expert_biases()
            record = _record(step, lr, totals, grad_norm, out, model,
                             time.perf_counter() - step_started, args)
            step += 1
            if args.eval_every and (step % args.eval_every == 0 or step == schedule_steps):
                record["val_loss"] = evaluate(model, val_corpus, args, device)
            history.append(record)
            if on_step is not None:
                on_step(record)
            if progress is not None:
                progress.set_postfix(_postfix(record), refresh=False)
                progress.update(1)
            now = time.perf_counter()
            if plan_pending and step - start_step == 2:
                probe_started = now  # the first steps carry one-time costs: measure after them
            if plan_pending and step - start_step == 2 + PLAN_AFTER_STEPS:
                plan_pending = False
                schedule_steps = _announce_plan(step, schedule_steps, now - probe_started,
                                                now - started, args, progress)
            if requests.signal_name is not None:
                stopped = requests.signal_name
                break
            if args.max_minutes is not None and now - started > 60 * args.max_minutes:
                if step < schedule_steps:
                    stopped = "time limit"
                    if "val_loss" not in record:
                        record["val_loss"] = evaluate(model, val_corpus, args, device)
                break
            due = (args.save_every and step % args.save_every == 0) or (
                now - last_save > 60 * args.save_every_minutes)
            if due and step < schedule_steps:
                save()
                last_save = time.perf_counter()
        if progress is not None:
            progress.close()
        save()
    minutes = (time.perf_counter() - started) / 60
    _report_stop(stopped, step, schedule_steps, minutes, args)
    return TrainResult(model, history, (train_corpus, val_corpus), stopped, schedule_steps,
                       minutes)


def _report_stop(stopped: str, step: int, schedule_steps: int, minutes: float,
                 args: TrainArgs) -> None:
    """One honest line on how the run ended (and how to go on) when it did not simply finish."""
    resume = f"minimoe train --resume --out {args.out_dir}"
    saved = f"saved in {args.out_dir}; " if args.save else ""
    if stopped == "time limit":
        say(f"stopped at step {step} of {schedule_steps} after {minutes:.1f} minutes "
            f"(--max-minutes {args.max_minutes:g}); {saved}resume with: {resume}")
    elif stopped != "finished":
        say(f"{stopped}: stopped at step {step} of {schedule_steps}; {saved}resume with: {resume}")
    elif schedule_steps < args.steps:
        go_on = f"; to train on towards {args.steps}: {resume} --max-minutes 0" if args.save else ""
        say(f"trained the planned {schedule_steps} of the {args.steps} steps asked for in "
            f"{minutes:.1f} minutes (--max-minutes {args.max_minutes:g}){go_on}")
