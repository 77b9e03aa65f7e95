"""The command-line commands for checkpoints: generate, chat, convert.

    minimoe generate CKPT --prompt "..." [--max-new-tokens N] [--temperature T] [--top-k K]
                     [--top-p P] [--layers 0-3] [--dtype bfloat16] [--speculative [N]]
                     [--offload-experts CACHE] [--seed S] [--chat]
    minimoe chat CKPT [--system "..."] [same sampling and loading options]
    minimoe convert fp8-to-bf16 SRC DST

CKPT is a local checkpoint folder or a hub repo id (``minimoe.checkpoints.hub``; with ``--layers`` only
the shards holding those layers are downloaded), or a folder minimoe wrote itself: a
``minimoe train`` run folder, a merged LoRA model, or ``minimoe finetune``'s adapters (loaded
onto the base model they name). The text goes through the checkpoint's own tokenizer
(``minimoe.checkpoints.tokenizer``; a minimoe run folder names its byte tokenizer in byte_tokenizer.json). ``generate`` prints the prompt and its continuation on
stdout and the speed (and, with --speculative, the draft acceptance; with --offload-experts,
the expert cache's hits and misses) on stderr. ``chat`` reads one user message per line of
stdin, keeps the conversation, renders it with the chat template and prints each answer on
one line block; ``/reset`` forgets the conversation, ``/exit`` (or end of input) stops. Each
turn re-reads the whole conversation (no KV cache across turns: simple, and exact).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16}


def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; None -> None (every layer)."""
    if text is None:
        return None
    layers = []
    try:
        for part in text.split(","):
            if "-" in part:
                low, high = part.split("-")
                layers.extend(range(int(low), int(high) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers expects indices like '0-3,7', got {text!r}")
    return layers


def _add_model_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or hub repo id (owner/name)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="0 = greedy decoding")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--layers", type=parse_layers, default=None,
                        help="load only these decoder layers, e.g. 0-3 (a truncated model: "
                        "for looking inside, not for good text)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="parameter dtype (auto = the checkpoint's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--offload-experts", type=int, default=None, metavar="CACHE",
                        help="keep routed experts on disk, CACHE experts in memory")


def _with_clear_errors(handler):
    """Report a loading problem (missing tensor, shard, download) as one line and exit code 2."""
    def run(options: argparse.Namespace) -> int:
        try:
            return handler(options)
        except (KeyError, OSError, ImportError, NotImplementedError, ValueError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"minimoe {options.command}: error: {message}", file=sys.stderr)
            return 2

    return run


def add_checkpoint_commands(commands) -> None:
    """Register generate, chat and convert on the `minimoe` sub-command parser."""
    generate = commands.add_parser("generate", help="continue a prompt with a checkpoint")
    _add_model_arguments(generate, temperature=0.0)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true",
                          help="wrap the prompt as one user message with the chat template")
    generate.add_argument("--speculative", type=int, nargs="?", const=-1, default=None,
                          metavar="DRAFTS", help="speculative decoding with the MTP modules "
                          "(DRAFTS tokens per step; default: one per module)")
    generate.add_argument("--compile", action="store_true", help="decode over a pre-allocated "
                          "cache with a torch.compile'd step (compiles first, then runs faster)")
    generate.set_defaults(handler=_with_clear_errors(command_generate))

    chat = commands.add_parser("chat", help="chat with a checkpoint (one message per line)")
    _add_model_arguments(chat, temperature=0.7)
    chat.add_argument("--system", default=None, help="a system message to start with")
    chat.set_defaults(handler=_with_clear_errors(command_chat))

    convert = commands.add_parser("convert", help="rewrite a checkpoint (fp8-to-bf16)")
    convert.add_argument("conversion", choices=["fp8-to-bf16"])
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.set_defaults(handler=_with_clear_errors(command_convert))


def _load(options):
    """(model, tokenizer) from the options; the tokenizer is read first (a quick failure)."""
    from minimoe.checkpoints.load import load_pretrained, resolve_checkpoint_folder
    from minimoe.checkpoints.tokenizer import load_tokenizer
    from minimoe.run_folder import folder_kind, recover_if_interrupted

    recover_if_interrupted(options.checkpoint)  # a run folder a kill left inside a save
    folder = resolve_checkpoint_folder(options.checkpoint, options.layers)
    kind = folder_kind(folder)
    if kind != "published":  # what minimoe train / finetune wrote
        return _load_minimoe_folder(folder, kind, options)
    tokenizer = load_tokenizer(folder)
    offload = options.offload_experts is not None
    model = load_pretrained(folder, dtype=DTYPES[options.dtype], device=options.device,
                            layers=options.layers, offload_experts=offload,
                            expert_cache_size=options.offload_experts if offload else 64)
    return model, tokenizer


def _load_minimoe_folder(folder: str, kind: str, options):
    """A `minimoe train` run folder (or a merged LoRA), or `minimoe finetune`'s adapters
    (base model + adapters; the tokenizer from the adapters' folder, else the base's)."""
    import json
    import os

    from minimoe.run_folder import load_model
    from minimoe.checkpoints.tokenizer import load_tokenizer

    if options.layers is not None or options.offload_experts is not None:
        raise ValueError(f"--layers and --offload-experts read published checkpoints; {folder} "
                         "is a minimoe run folder (load it whole)")
    if kind == "adapters":
        from minimoe.lora import load_finetuned

        with open(os.path.join(folder, "adapter_config.json")) as handle:
            base = json.load(handle).get("base_model") or folder
        has_own = any(os.path.exists(os.path.join(folder, name))
                      for name in ("tokenizer.json", "byte_tokenizer.json"))
        tokenizer = load_tokenizer(folder if has_own or not os.path.isdir(base) else base)
        model = load_finetuned(folder)
    else:
        tokenizer = load_tokenizer(folder)
        model = load_model(folder)
    dtype = DTYPES[options.dtype]
    return model.to(device=options.device, dtype=dtype).eval(), tokenizer


def _check_ids(ids: list[int], model) -> torch.Tensor:
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if max(ids) >= model.cfg.vocab_size:
        raise ValueError(f"the tokenizer produced id {max(ids)}, but the model's vocab_size is "
                         f"{model.cfg.vocab_size}: tokenizer and checkpoint do not match")
    device = next(model.parameters()).device
    return torch.tensor([ids], device=device)  # (1, T)


def _sample(model, input_ids, options, eos_token_id, speculative=None):
    """-> (new token ids, stats dict or None)."""
    from minimoe.speculative import speculative_generate

    generator = torch.Generator(device=input_ids.device).manual_seed(options.seed)
    sampling = dict(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                    generator=generator, eos_token_id=eos_token_id,
                    compile=getattr(options, "compile", False))
    if speculative is not None:
        drafts = None if speculative < 0 else speculative
        out, stats = speculative_generate(model, input_ids, options.max_new_tokens,
                                          num_draft_tokens=drafts, **sampling)
        stats = stats.summary()
    else:
        out, stats = model.generate(input_ids, options.max_new_tokens, **sampling), None
    new = out[0, input_ids.shape[1]:].tolist()
    if eos_token_id is not None and eos_token_id in new:
        new = new[: new.index(eos_token_id)]
    return new, stats


def _report(options, model, new_tokens: int, seconds: float, stats) -> None:
    line = f"[{new_tokens} tokens in {seconds:.2f} s, {new_tokens / max(seconds, 1e-9):.1f} tokens/s"
    if stats is not None:
        line += (f"; speculative: {stats['mean_accepted_length']:.2f} drafts accepted per step, "
                 f"{stats['tokens_per_forward']:.2f} tokens per main forward")
    store = getattr(model, "expert_store", None)
    if store is not None:
        expert = store.stats()
        line += (f"; expert cache: {expert['hits']} hits, {expert['misses']} misses, "
                 f"{expert['bytes_loaded'] / 1e6:.1f} MB read")
    print(line + "]", file=sys.stderr)


def command_generate(options: argparse.Namespace) -> int:
    model, tokenizer = _load(options)
    if options.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": options.prompt}])
    else:
        ids = tokenizer.encode(options.prompt)
    input_ids = _check_ids(ids, model)
    start = time.perf_counter()
    new, stats = _sample(model, input_ids, options, tokenizer.eos_token_id, options.speculative)
    seconds = time.perf_counter() - start
    prompt_text = options.prompt if not options.chat else ""
    print(prompt_text + tokenizer.decode(new, skip_special_tokens=True))
    _report(options, model, len(new), seconds, stats)
    return 0


def command_chat(options: argparse.Namespace, stdin=None) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    model, tokenizer = _load(options)
    if tokenizer.chat_template is None:
        raise ValueError(f"{options.checkpoint} has no chat template; use `minimoe generate`")
    interactive = stdin.isatty()
    start_messages = [] if options.system is None else [{"role": "system",
                                                         "content": options.system}]
    messages = list(start_messages)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(start_messages)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        input_ids = _check_ids(tokenizer.apply_chat_template(messages), model)
        if input_ids.shape[1] + options.max_new_tokens > model.cfg.max_position_embeddings:
            messages.pop()  # the message is not answered; the conversation goes on without it
            print(f"minimoe chat: the conversation ({input_ids.shape[1]} tokens) + "
                  f"max_new_tokens ({options.max_new_tokens}) exceeds max_position_embeddings "
                  f"({model.cfg.max_position_embeddings}); /reset to start over", file=sys.stderr)
            continue
        start = time.perf_counter()
        stop_id = getattr(tokenizer, "chat_stop_token_id", tokenizer.eos_token_id)
        new, _ = _sample(model, input_ids, options, stop_id)
        reply = tokenizer.decode(new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        print(("assistant> " if interactive else "") + reply, flush=True)
        if interactive:
            _report(options, model, len(new), time.perf_counter() - start, None)
    return 0


def command_convert(options: argparse.Namespace) -> int:
    from minimoe.checkpoints.export import convert_fp8_to_bf16

    start = time.perf_counter()
    report = convert_fp8_to_bf16(options.source, options.destination, progress=True)
    print(f"converted {options.source} -> {options.destination}: {report['tensors']} tensors "
          f"({report['dequantised']} dequantised from FP8) in {report['shards']} shards, "
          f"{time.perf_counter() - start:.1f} s")
    return 0
