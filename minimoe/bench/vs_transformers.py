"""Benchmark: minimoe (eager and compiled) against transformers on the same weights.

    python -m minimoe.bench.vs_transformers                  # the toy, 2 threads
    python -m minimoe.bench.vs_transformers --checkpoint runs/toy   # a `minimoe train` run
    python -m minimoe.bench.vs_transformers --quick          # tiny sizes: checks it runs

The toy (random weights, or the checkpoint given) is exported with
``minimoe.save_pretrained`` as a DeepSeek-V3 checkpoint and loaded by transformers'
``AutoModelForCausalLM`` once per experts implementation (``experts_implementation=``
"eager", "batched_mm", "grouped_mm": its public switch). Rows, each timed in this one run
(a warm-up also pays every compilation; then the median of --repeats calls, or for the
tasks timed in alternation the median of --rounds rounds):

* training step (forward + backward + AdamW) on batch x seq tokens. minimoe's loss includes
  its MTP module and the sequence balance loss (more work than transformers' plain CE), so
  minimoe also runs without its MTP module (the same main-model weights): the same work;
* prefill: one forward over a 1 x prefill_len prompt, no grad;
* greedy decoding at batch 1 and batch 8: minimoe's ``generate`` eager and with
  ``compile=True`` (``minimoe.static_cache``); transformers' ``generate`` with its dynamic
  cache, with ``cache_implementation="static"`` (on a CPU its automatic compilation is
  skipped: the row is what a user gets), and with that compilation forced through
  ``CompileConfig`` (its private ``_compile_all_devices`` flag);
* MTP speculative decoding (``minimoe.speculative``, compiled) against plain compiled
  decoding, on one prompt per domain of the synthetic corpus (what the toy was trained on),
  the two timed in alternation.

Every greedy output is asserted identical to minimoe's eager greedy output. The table
gives tokens/s and each row's ratio to the best transformers configuration of that task
that a user selects through transformers' public API (the forced compilation is listed,
and its ratio shows how far ahead of it minimoe is, but it is not that reference). The
systems of the training and prefill tasks are timed in alternation (``alternating_medians``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import statistics
import tempfile
import time

import torch

import minimoe
from minimoe import data as data_lib
from minimoe.experiments.mtp import domain_prompts
from minimoe.speculative import speculative_generate
from minimoe.train import TrainArgs, load_checkpoint, make_optimizer, train

EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


PRIVATE_FLAG_ROW = "compile forced"  # rows that need a private transformers switch
TIE_MARGIN = 1e-4  # top-2 logit gap below which float rounding may pick either token


def assert_same_greedy(out, reference, model, name: str) -> None:
    """Greedy tokens identical; a divergence is accepted only at a float tie of the reference.

    Two float32 implementations agree to ~1e-6 in the logits; where minimoe's two best
    logits are closer than TIE_MARGIN the argmax may legitimately differ (then the sequences
    diverge). Any other difference fails."""
    if torch.equal(out, reference):
        return
    row, position = (out != reference).nonzero()[0].tolist()
    with torch.no_grad():
        logits = model(reference[row:row + 1, :position]).logits[0, -1]
    top2 = logits.topk(2).values
    margin = float(top2[0] - top2[1])
    assert margin < TIE_MARGIN, (f"{name}: greedy token differs at sequence {row}, position "
                                 f"{position}, where minimoe's top-2 logit margin is {margin:.2e}")
    print(f"  note: {name} diverges at a float tie (sequence {row}, position {position}, "
          f"top-2 margin {margin:.1e})", flush=True)


def median_seconds(run, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def alternating_medians(runs: dict, warmup: int, rounds: int) -> dict:
    """{name: median seconds}: every run warmed up, then timed in rounds of one call each,
    so that a slow phase of a shared machine hits every system of a task alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def train_step_runner(model, forward, batch: torch.Tensor, minimoe_model: bool):
    """One optimiser step on batch (B, T + 1): forward + backward + AdamW."""
    # transformers: what its Trainer picks by default on torch >= 2.8 ("adamw_torch_fused"),
    # the same fused AdamW as minimoe's make_optimizer
    optimizer = make_optimizer(model, TrainArgs()) if minimoe_model else \
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def run():
        if minimoe_model:
            loss = forward(inputs, targets=targets).loss
        else:
            loss = forward(input_ids=batch, labels=batch).loss  # transformers shifts itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def without_mtp(model):
    """A copy of `model` without its MTP modules (transformers' DeepseekV3 has none): the
    same main-model weights, so the training rows can compare the same work."""
    cfg = dataclasses.replace(model.cfg, num_nextn_predict_layers=0)
    copy_ = minimoe.Transformer(cfg)
    main_weights = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    copy_.load_state_dict(main_weights)  # strict: every main-model tensor, nothing else
    return copy_


def load_transformers(folder: str, implementation: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 experts_implementation=implementation)
    return model.eval()


def hf_generate(model, prompt, new_tokens: int, mode: str):
    """transformers' greedy generate: mode "dynamic", "static" or "static, compile forced"."""
    from transformers import CompileConfig

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    if mode != "dynamic":
        kwargs["cache_implementation"] = "static"
    if mode == "static, compile forced":
        config = CompileConfig()
        config._compile_all_devices = True  # transformers' own switch to compile on a CPU
        kwargs["compile_config"] = config
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)


class Table:
    def __init__(self) -> None:
        self.rows = []  # (task, system, tokens/s)

    def add(self, task: str, system: str, tokens: int, seconds: float) -> None:
        self.rows.append((task, system, tokens / seconds))
        print(f"  {task:<28} {system:<52} {tokens / seconds:10.1f} tokens/s", flush=True)

    def markdown(self) -> str:
        lines = ["| task | system | tokens/s | vs best transformers |", "|---|---|---:|---:|"]
        for task in dict.fromkeys(row[0] for row in self.rows):
            rows = [row for row in self.rows if row[0] == task]
            # the best configuration a user selects through transformers' public API: the
            # compilation forced through a private flag is reported, not a reference
            hf = [speed for _, system, speed in rows
                  if system.startswith("transformers") and PRIVATE_FLAG_ROW not in system]
            best = max(hf) if hf else None
            first = rows[0][2]  # a task without transformers rows (speculative): its reference
            for _, system, speed in rows:
                ratio = f"{speed / best:.2f}x" if best else f"{speed / first:.2f}x its first row"
                lines.append(f"| {task} | {system} | {speed:.1f} | {ratio} |")
        return "\n".join(lines)


def bench_training(table, model, hf_models, options, gen) -> None:
    B, T = options.train_batch, options.train_len
    batch = torch.randint(0, model.cfg.vocab_size, (B, T + 1), generator=gen)
    task = f"training step {B}x{T}"
    # the timed optimiser steps change the weights: restore them so every later row runs
    # the exported weights in both libraries
    saved = {name: copy.deepcopy(m.state_dict()) for name, m in [("minimoe", model),
                                                                  *hf_models.items()]}
    main_only = without_mtp(model)  # the work transformers does: no MTP module
    runs = {}
    for suffix, m in (("", model), (", no MTP module", main_only)):
        m.train()
        runs[f"minimoe eager{suffix}"] = train_step_runner(m, m, batch, True)
        runs[f"minimoe torch.compile{suffix}"] = train_step_runner(m, torch.compile(m), batch, True)
    for implementation, hf in hf_models.items():
        hf.train()
        runs[f"transformers {implementation}"] = train_step_runner(hf, hf, batch[:, :T], False)
    for name, seconds in alternating_medians(runs, options.warmup, options.rounds).items():
        table.add(task, name, B * T, seconds)
    for name, m in [("minimoe", model), *hf_models.items()]:
        m.eval()
        m.load_state_dict(saved[name])


def bench_prefill(table, model, hf_models, options, gen) -> None:
    prompt = torch.randint(0, model.cfg.vocab_size, (1, options.prefill_len), generator=gen)
    task = f"prefill 1x{options.prefill_len}"
    compiled = torch.compile(model)
    runs = {"minimoe eager": functools.partial(model, prompt),
            "minimoe torch.compile": functools.partial(compiled, prompt)}
    for implementation, hf in hf_models.items():
        runs[f"transformers {implementation}"] = functools.partial(hf, prompt)
    with torch.no_grad():
        medians = alternating_medians(runs, options.warmup, options.rounds)
    for name, seconds in medians.items():
        table.add(task, name, options.prefill_len, seconds)


def bench_decode(table, model, hf_models, batch_size, options, gen) -> torch.Tensor:
    prompt = torch.randint(0, model.cfg.vocab_size, (batch_size, options.prompt_len), generator=gen)
    n = options.new_tokens
    task = f"greedy decode, batch {batch_size}"
    reference = model.generate(prompt, n)
    for name, compile in (("minimoe eager", False), ("minimoe compile=True (static cache)", True)):
        out = model.generate(prompt, n, compile=compile)
        assert torch.equal(out, reference), f"{name}: greedy output differs from eager"
        seconds = median_seconds(lambda: model.generate(prompt, n, compile=compile),
                                 options.warmup, options.repeats)
        table.add(task, name, batch_size * n, seconds)
    modes = [(impl, "dynamic") for impl in hf_models] + [
        (options.hf_decode_impl, "static"), (options.hf_decode_impl, "static, compile forced")]
    for implementation, mode in modes:
        hf = hf_models[implementation]
        out = hf_generate(hf, prompt, n, mode)
        assert_same_greedy(out, reference, model, f"transformers {implementation} {mode}")
        seconds = median_seconds(lambda: hf_generate(hf, prompt, n, mode),
                                 options.warmup, options.repeats)
        table.add(task, f"transformers {implementation}, {mode} cache", batch_size * n, seconds)
    return reference


def corpus_prompts(prompt_len: int) -> list:
    """One prompt (1, prompt_len) per domain of the synthetic corpus' validation text: what
    the toy was trained on, so its MTP module drafts as it would for a user of the toy."""
    _, val = data_lib.build_corpus(TrainArgs().corpus_tokens, seed=0).split(0.05)
    by_domain = domain_prompts(val, prompt_len, per_domain=1)
    return [prompt for prompts in by_domain.values() for prompt in prompts]


def bench_speculative(table, model, options) -> None:
    """Plain against speculative compiled decoding over the corpus prompts, the two timed in
    alternation (a slow phase of the machine hits both alike), outputs asserted identical."""
    prompts = corpus_prompts(options.prompt_len)
    n = options.spec_tokens
    task = f"MTP speculative, batch 1 ({len(prompts)} corpus prompts)"

    def plain():
        return [model.generate(p, n, compile=True) for p in prompts]

    def speculative():
        return [speculative_generate(model, p, n, compile=True) for p in prompts]

    passes = []
    for reference, (ids, stats) in zip(plain(), speculative()):  # also the warm-up
        assert torch.equal(ids, reference), "speculative output differs from greedy"
        passes.append(stats.tokens_per_forward)
    medians = alternating_medians({"plain": plain, "speculative": speculative}, 0,
                                  options.spec_repeats)  # (warmed up above)
    tokens = len(prompts) * n
    table.add(task, "minimoe compile=True, plain", tokens, medians["plain"])
    table.add(task, f"minimoe compile=True, speculative ({statistics.mean(passes):.2f} tokens "
              f"per main pass)", tokens, medians["speculative"])


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a `minimoe train` output folder "
                        "(default: the toy preset with random weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=300,
                        help="steps of training for the toy when no --checkpoint is given")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per decode row")
    parser.add_argument("--rounds", type=int, default=9,
                        help="timed rounds of the training and prefill tasks (each round runs "
                        "every system once: a shared machine's slow phases move a row by 10-25%%)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--hf-decode-impl", default="grouped_mm", choices=EXPERTS_IMPLEMENTATIONS)
    options = parser.parse_args(argv)
    sizes = dict(train_batch=16, train_len=128, prefill_len=1000, prompt_len=32, new_tokens=64,
                 spec_tokens=96, spec_repeats=7)
    if options.quick:
        sizes = dict(train_batch=2, train_len=16, prefill_len=32, prompt_len=8, new_tokens=4,
                     spec_tokens=4, spec_repeats=1)
        options.repeats, options.rounds, options.warmup = 1, 1, 1
    for name, value in sizes.items():
        setattr(options, name, value)
    return options


def main(argv=None) -> int:
    options = parse(argv)
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    if options.checkpoint:
        model = load_checkpoint(options.checkpoint)
        source = f"checkpoint {options.checkpoint}"
    else:  # random weights give near-flat logits, whose argmax float rounding can flip
        steps = 20 if options.quick else options.train_steps
        overrides = {"num_hidden_layers": 2} if options.quick else {}
        args = TrainArgs(preset="toy", config_overrides=overrides, steps=steps, batch_size=8,
                         seq_len=64, eval_every=10**9, corpus_tokens=200_000, progress=False,
                         save=False, out_dir=tempfile.mkdtemp())
        model, _, _ = train(args)
        source = f"toy trained here for {steps} steps of 8x64 tokens"
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        minimoe.save_pretrained(model, folder, family="deepseek_v3")
        hf_models = {impl: load_transformers(folder, impl) for impl in EXPERTS_IMPLEMENTATIONS}
    print(f"minimoe vs transformers, same weights ({source}), float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    table = Table()
    bench_training(table, model, hf_models, options, gen)
    bench_prefill(table, model, hf_models, options, gen)
    for batch_size in (1, 8):
        bench_decode(table, model, hf_models, batch_size, options, gen)
    bench_speculative(table, model, options)
    print(f"\nafter {options.warmup} warm-up: training and prefill the median of "
          f"{options.rounds} alternating rounds, decoding the median of {options.repeats} calls, "
          f"speculative the median of {options.spec_repeats} alternating rounds; greedy outputs "
          "identical to minimoe eager in every decode row (transformers: up to a float tie, "
          "noted above)\n")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
