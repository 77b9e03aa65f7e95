"""The `minimoe` command line: train, finetune, sample, sizing, generate, chat, convert.

`minimoe train` is the project's main job: it trains the `toy` preset (DeepSeek-V3 in
miniature) on the bundled synthetic corpus, then shows what the router learned -- which
experts each domain of text goes to -- writes that as a figure, and samples text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DEFAULT_FIGURE = os.path.join("figures", "routing_by_domain.png")


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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from minimoe.train import TrainArgs

    defaults = TrainArgs()
    parser.add_argument("--preset", default=defaults.preset, help="ModelConfig preset (toy, "
                        "toy-classic, toy-gqa, toy-dense, ...)")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override,
                        default=[], metavar="FIELD=VALUE",
                        help="change a ModelConfig field, e.g. --set aux_loss_alpha=0.01")
    parser.add_argument("--data", default=None, help="train on this UTF-8 text file instead "
                        "of the synthetic multi-domain corpus")
    parser.add_argument("--out", dest="out_dir", default=defaults.out_dir)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--min-lr", type=float, default=defaults.min_lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | mps")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["fp32", "bf16"])
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training "
                        "step (pays the compilation once; see notebooks/results/vs_transformers.md)")
    parser.add_argument("--fp8", action="store_true", help="FP8 GEMMs for the experts and "
                        "attention projections (ModelConfig.fp8, minimoe.fp8; simulated on a CPU)")
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    parser.add_argument("--max-minutes", type=float, default=4.0,
                        help="stop (and save) after this many minutes of training, so the "
                        "default run fits in five minutes on a slow laptop (0 = no limit)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help="routing figure path")
    parser.add_argument("--no-progress", action="store_true")


def command_train(options: argparse.Namespace) -> int:
    from minimoe import data as data_lib
    from minimoe.train import TrainArgs, train
    from minimoe.viz import format_usage_table, plot_domain_usage, routing_report

    if options.threads:
        torch.set_num_threads(options.threads)
    overrides = dict(options.overrides)
    if options.fp8:
        overrides["fp8"] = True
    args = TrainArgs(
        preset=options.preset, config_overrides=overrides, data=options.data,
        out_dir=options.out_dir, steps=options.steps, batch_size=options.batch_size,
        seq_len=options.seq_len, grad_accum=options.grad_accum, lr=options.lr,
        min_lr=options.min_lr, warmup_steps=options.warmup_steps,
        eval_every=options.eval_every, seed=options.seed, device=options.device,
        dtype=options.dtype, grad_checkpointing=options.grad_checkpointing,
        resume=options.resume, max_minutes=options.max_minutes or None,
        progress=not options.no_progress, compile=options.compile,
    )
    model, history, (_, val_corpus) = train(args)
    cfg = model.cfg
    params = model.num_parameters()
    final = history[-1]
    print(f"\ntrained {cfg.name}: {params / 1e6:.2f}M parameters, {len(history)} steps, "
          f"{sum(h['tokens_per_second'] for h in history) / len(history):.0f} tokens/s, "
          f"final val loss {final.get('val_loss', float('nan')):.3f} nats/byte "
          f"(train {final['ce']:.3f}"
          + (f", MTP depth 1: {final['mtp_ce_1']:.3f}" if "mtp_ce_1" in final else "") + ")")
    print(f"checkpoint: {args.out_dir}")

    device = next(model.parameters()).device
    if cfg.is_moe:
        x, _, domains = next(data_lib.iterate_eval_batches(val_corpus, 32, args.seq_len))
        report = routing_report(model, x.to(device), domains, val_corpus.domain_names)
        print()
        print(format_usage_table(report))
        if options.figure:
            os.makedirs(os.path.dirname(options.figure) or ".", exist_ok=True)
            plot_domain_usage(report, options.figure,
                              title=f"{cfg.name}: share of each domain's token-slots per expert")
            print(f"\nrouting figure: {options.figure}")

    tokenizer = data_lib.ByteTokenizer()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    print("\nsamples (temperature 0.8, top-k 40):")
    for prompt in ("The ", "def ", "12 + ", '{"'):
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        out = model.generate(ids, max_new_tokens=80, temperature=0.8, top_k=40,
                             generator=generator)
        text = tokenizer.decode(out[0].tolist())
        print("  " + repr(text))
    return 0


def command_sizing(options: argparse.Namespace) -> int:
    from minimoe import sizing

    print(sizing.summary_table(options.presets or list(sizing.PUBLISHED)))
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
    parser.add_argument("--out", dest="out_dir", default=defaults.out_dir)
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
    if args.merge:
        print(f"merged model: {os.path.join(args.out_dir, 'merged')}")
    return 0


def main(argv: list[str] | None = None) -> int:
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

    add_checkpoint_commands(commands)  # generate, chat, convert (published checkpoints)
    options = parser.parse_args(argv)
    try:
        return options.handler(options)
    except (ValueError, FileNotFoundError) as error:
        print(f"minimoe {options.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
