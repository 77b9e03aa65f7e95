"""The `minimoe` command line: train, finetune, sizing, generate, chat, convert.

`minimoe train` is the project's main job: it trains the `toy` preset (DeepSeek-V3 in
miniature) on the bundled synthetic corpus, then shows what the router learned -- which
experts each domain of text goes to -- writes that as a figure into the run folder, samples
text, and says how to talk to the model (`minimoe chat runs/toy`).

A run folder is never overwritten by a new run (``--overwrite`` asks for it); ``--resume``
continues the saved run with its own settings, and a flag that contradicts them is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

FIGURE_NAME = "routing_by_domain.png"  # written into the run folder


def parse_override(text: str) -> tuple[str, object]:
    """'aux_loss_alpha=0.01' -> ('aux_loss_alpha', 0.01); values parsed as JSON when possible."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects FIELD=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


# --flag -> (TrainArgs field, type); the defaults come from TrainArgs and are shown in --help.
# A flag left out is absent from the parsed options (argparse.SUPPRESS), so that --resume can
# tell "not given: keep the saved run's value" from "given: must agree with it".
TRAIN_FLAGS = {
    "--preset": ("preset", str, "ModelConfig preset (toy, toy-classic, toy-gqa, toy-dense, ...)"),
    "--data": ("data", str, "train on this UTF-8 text file instead of the synthetic "
               "multi-domain corpus"),
    "--out": ("out_dir", str, "the run folder (default: runs/PRESET, plus -DATA for --data "
              "and -FIELD=VALUE for each --set, e.g. runs/toy-classic, runs/toy-my)"),
    "--steps": ("steps", int, "optimiser steps to train for"),
    "--batch-size": ("batch_size", int, "sequences per micro-batch"),
    "--seq-len": ("seq_len", int, "tokens (bytes) per sequence"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimiser step"),
    "--lr": ("lr", float, "peak learning rate"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine"),
    "--warmup-steps": ("warmup_steps", int, "linear warmup steps"),
    "--eval-every": ("eval_every", int, "validate every N steps (0: only at the end)"),
    "--seed": ("seed", int, "seed of the weights, the corpus and the batches"),
    "--device": ("device", str, "auto | cpu | cuda | mps"),
    "--save-every": ("save_every", int, "also save a checkpoint every N steps (0: by time only)"),
    "--save-every-minutes": ("save_every_minutes", float, "save a checkpoint at least this "
                             "often: a killed run loses at most this much"),
}
CLI_MAX_MINUTES = 4.0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from minimoe.train import TrainArgs

    defaults = TrainArgs()
    for flag, (name, kind, text) in TRAIN_FLAGS.items():
        default = getattr(defaults, name)
        shown = f" (default: {default})" if default is not None and flag != "--out" else ""
        parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS,
                            help=text + shown)
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=argparse.SUPPRESS, metavar="FIELD=VALUE",
                        help="change a ModelConfig field, e.g. --set aux_loss_alpha=0.01")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=argparse.SUPPRESS,
                        help=f"training precision (default: {defaults.dtype})")
    for flag, text in (("--grad-checkpointing", "recompute activations in backward"),
                       ("--fp8", "FP8 GEMMs for the experts and attention projections "
                        "(ModelConfig.fp8, minimoe.fp8; simulated on a CPU)"),
                       ("--compile", "torch.compile the training step (pays the compilation "
                        "once; see notebooks/results/vs_transformers.md)")):
        parser.add_argument(flag, action="store_true", help=text)  # False: not given
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out "
                        "(its settings; a flag that contradicts them is an error)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in "
                        "--out (never done without this flag)")
    parser.add_argument("--max-minutes", type=float, default=CLI_MAX_MINUTES,
                        help="time budget of the training loop, in minutes (default: "
                        f"{CLI_MAX_MINUTES:g}, so the default run fits in five minutes on a "
                        "slow laptop; 0 = no limit). The learning-rate schedule is planned to "
                        "end within it; a run it stops is saved and says how to resume")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--figure", default=None, help="routing figure path (default: "
                        f"OUT/{FIGURE_NAME})")
    parser.add_argument("--no-progress", action="store_true")


def train_args_from_options(options: argparse.Namespace):
    """TrainArgs from the parsed flags: TrainArgs' defaults for a new run, the saved run's
    settings for --resume; the flags given on top (train.validate_args checks them)."""
    from minimoe import run_folder
    from minimoe.train import TrainArgs, default_out_dir

    given = {name: getattr(options, name) for name, *_ in TRAIN_FLAGS.values()
             if hasattr(options, name)}
    if hasattr(options, "dtype"):
        given["dtype"] = options.dtype
    if options.grad_checkpointing:
        given["grad_checkpointing"] = True
    if options.compile:
        given["compile"] = True
    overrides = dict(getattr(options, "overrides", []))
    if options.fp8:
        overrides["fp8"] = True
    if overrides or hasattr(options, "overrides"):
        given["config_overrides"] = overrides
    values = dict(vars(TrainArgs()))
    if options.resume:
        out_dir = given.get("out_dir") or default_out_dir(
            given.get("preset", "toy"), given.get("data"), given.get("config_overrides"))
        if run_folder.recover(out_dir) is not None and run_folder.is_complete(out_dir):
            saved = run_folder.read_state(out_dir).get("args", {})
            values.update({k: v for k, v in saved.items() if k in values})
            if "config_overrides" in given:  # --set / --fp8 change the saved model's fields
                given["config_overrides"] = {**saved.get("config_overrides", {}), **overrides}
        given["out_dir"] = out_dir
    values.update(given)
    values.update(resume=options.resume, overwrite=options.overwrite,
                  max_minutes=options.max_minutes or None, progress=not options.no_progress)
    if not options.resume and "out_dir" not in given:
        values["out_dir"] = None  # train.validate_args derives it from the preset and data
    return TrainArgs(**values)


def command_train(options: argparse.Namespace) -> int:
    from minimoe import data as data_lib
    from minimoe.train import run_training
    from minimoe.viz import format_usage_table, plot_domain_usage, routing_report

    if options.threads:
        torch.set_num_threads(options.threads)
    args = train_args_from_options(options)
    result = run_training(args)
    if result.stopped in ("SIGINT", "SIGTERM"):
        return 130 if result.stopped == "SIGINT" else 143
    model, history, (_, val_corpus) = result.model, result.history, result.corpora
    cfg = model.cfg
    params = model.num_parameters()
    final = history[-1]
    print(f"\ntrained {cfg.name}: {params / 1e6:.2f}M parameters, {len(history)} steps, "
          f"{sum(h['tokens_per_second'] for h in history) / len(history):.0f} tokens/s, "
          f"final val loss {final.get('val_loss', float('nan')):.3f} nats/byte "
          f"(train {final['ce']:.3f}"
          + (f", MTP depth 1: {final['mtp_ce_1']:.3f}" if "mtp_ce_1" in final else "") + ")")
    print(f"run folder: {args.out_dir}" + ("" if args.save else " (not saved)"))

    device = next(model.parameters()).device
    if cfg.is_moe:
        x, _, domains = next(data_lib.iterate_eval_batches(val_corpus, 32, args.seq_len))
        report = routing_report(model, x.to(device), domains, val_corpus.domain_names)
        print()
        print(format_usage_table(report))
        figure = options.figure or os.path.join(args.out_dir, FIGURE_NAME)
        os.makedirs(os.path.dirname(figure) or ".", exist_ok=True)
        plot_domain_usage(report, figure,
                          title=f"{cfg.name}: share of each domain's token-slots per expert")
        print(f"\nrouting figure: {figure}")

    tokenizer = data_lib.ByteTokenizer()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    print("\nsamples (temperature 0.8, top-k 40):")
    for prompt in ("The ", "def ", "12 + ", '{"'):
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        out = model.generate(ids, max_new_tokens=80, temperature=0.8, top_k=40,
                             generator=generator)
        text = tokenizer.decode(out[0].tolist())
        print("  " + repr(text))
    print(f"\ntalk to it: minimoe chat {args.out_dir}   (or: minimoe generate {args.out_dir} "
          "--prompt \"def \")")
    return 0


def command_sizing(options: argparse.Namespace) -> int:
    from minimoe import sizing

    print(sizing.summary_table(options.presets or list(sizing.PUBLISHED)))
    print()
    print(sizing.SIZING_LEGEND)
    return 0


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from minimoe.lora import DEFAULT_TARGETS, QUANTIZE_KINDS, FinetuneArgs

    defaults = FinetuneArgs()
    parser.add_argument("model", help="a preset name (random weights), a `minimoe train` "
                        "checkpoint folder, or a published checkpoint folder / hub id")
    parser.add_argument("--data", required=True, help="UTF-8 text file, byte-tokenised "
                        "(ByteTokenizer: right for minimoe's own byte-level models)")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                        help="attention, shared_experts, dense_mlp and/or Linear names")
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    parser.add_argument("--quantize-base", choices=QUANTIZE_KINDS, default=None)
    parser.add_argument("--merge", action="store_true", help="also write the merged model to "
                        "OUT/merged, a checkpoint folder like `minimoe train` writes")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="FIELD=VALUE", help="change a preset's field")
    parser.add_argument("--out", dest="out_dir", default=None, help="the adapters' folder "
                        "(default: runs/MODEL-lora-DATA)")
    parser.add_argument("--overwrite", action="store_true", help="replace adapters already "
                        "in --out (never done without this flag)")
    parser.add_argument("--no-progress", action="store_true")
    for flag, name in (("--steps", "steps"), ("--batch-size", "batch_size"),
                       ("--seq-len", "seq_len"), ("--grad-accum", "grad_accum"),
                       ("--warmup-steps", "warmup_steps"), ("--eval-every", "eval_every"),
                       ("--seed", "seed")):
        parser.add_argument(flag, type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--min-lr", type=float, default=defaults.min_lr)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["fp32", "bf16"])
    parser.add_argument("--grad-checkpointing", action="store_true")


def command_finetune(options: argparse.Namespace) -> int:
    from minimoe.lora import FinetuneArgs, finetune, lora_parameter_count

    args = FinetuneArgs(
        model=options.model, data=options.data, lora_rank=options.lora_rank,
        lora_alpha=options.lora_alpha, targets=tuple(options.targets),
        lora_dropout=options.lora_dropout, quantize_base=options.quantize_base,
        merge=options.merge, config_overrides=dict(options.overrides), out_dir=options.out_dir,
        steps=options.steps, batch_size=options.batch_size, seq_len=options.seq_len,
        grad_accum=options.grad_accum, warmup_steps=options.warmup_steps,
        eval_every=options.eval_every, seed=options.seed, lr=options.lr, min_lr=options.min_lr,
        device=options.device, dtype=options.dtype, grad_checkpointing=options.grad_checkpointing,
        overwrite=options.overwrite, progress=not options.no_progress,
    )
    model, history = finetune(args)
    first, final = history[0], history[-1]
    count = lora_parameter_count(model.cfg, args.lora_rank, args.targets)
    print(f"LoRA rank {args.lora_rank} on {', '.join(args.targets)}: {count['trainable']:,} "
          f"trainable parameters ({100 * count['fraction']:.3f}% of {count['total']:,})")
    print(f"fine-tuned {args.model} for {len(history)} steps: train loss "
          f"{first['ce']:.3f} -> {final['ce']:.3f}"
          + (f", val {final['val_loss']:.3f}" if "val_loss" in final else ""))
    print(f"adapters: {args.out_dir}")
    talk_to = args.out_dir
    if args.merge:
        talk_to = os.path.join(args.out_dir, "merged")
        print(f"merged model: {talk_to}")
    print(f"talk to it: minimoe chat {talk_to}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `minimoe` parser with every sub-command (also what the README's test parses with)."""
    parser = argparse.ArgumentParser(prog="minimoe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a preset and show its routing")
    add_train_arguments(train_parser)
    train_parser.set_defaults(handler=command_train)
    finetune_parser = commands.add_parser("finetune", help="LoRA / QLoRA fine-tuning")
    add_finetune_arguments(finetune_parser)
    finetune_parser.set_defaults(handler=command_finetune)
    sizing_parser = commands.add_parser("sizing", help="parameter/FLOP/KV-cache table")
    sizing_parser.add_argument("presets", nargs="*")
    sizing_parser.set_defaults(handler=command_sizing)
    from minimoe.checkpoints.cli import add_checkpoint_commands

    add_checkpoint_commands(commands)  # generate, chat, convert
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    try:
        return options.handler(options)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"minimoe {options.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(f"\nminimoe {options.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
