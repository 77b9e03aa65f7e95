"""Benchmark: plain vs speculative (MTP-drafted) greedy decoding, tokens/s at batch 1.

    python -m minimoe.bench.speculative                 # the trained toy of the MTP experiment
    python -m minimoe.bench.speculative --new-tokens 128 --repeats 5 --threads 1

Loads the checkpoint written by ``python -m minimoe.experiments.mtp`` (runs/mtp/mtp; trained
here with the experiment's settings when missing), decodes from one prompt per domain of the
validation corpus, and prints a markdown table of tokens/s: plain ``model.generate``
against ``minimoe.speculative.speculative_generate`` with 1..D drafts per step (from the
trained MTP modules) and with D + 1 (the last module re-applied), each also with the
confidence gate (``min_draft_confidence``: stop drafting once a draft's own probability is
below the threshold). Plain and speculative runs alternate and the median of --repeats is
reported, so slow phases of a shared machine hit both alike. Every speculative output is
asserted identical to the plain greedy output. Also printed: the first draft's acceptance
per corpus domain.

``--clock cpu`` times with the process's CPU time instead of the wall clock: at one
thread it counts only the work of this process, so the ratios stay meaningful on a machine
busy with other jobs (the wall clock is the default and what a user sees).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch

from minimoe import data as data_lib
from minimoe.bench import progress
from minimoe.experiments import mtp as experiment
from minimoe.speculative import speculative_generate
from minimoe.train import load_checkpoint, train


def load_or_train(checkpoint: str, steps: int, seed: int):
    if not os.path.exists(os.path.join(checkpoint, "model.safetensors")):
        print(f"no checkpoint at {checkpoint}: training the MTP experiment's model "
              f"({steps} steps) ...", flush=True)
        args = experiment.train_args("mtp", steps, seed)
        args.out_dir = checkpoint
        train(args)
    return load_checkpoint(checkpoint).eval()


def variants(num_modules: int, gate: float) -> list:
    """(name, num_draft_tokens, min_draft_confidence) of every decoding compared."""
    rows = []
    for drafts in range(1, num_modules + 2):  # 1..D from trained modules, D+1 re-applies
        name = f"speculative, {drafts} draft{'s' if drafts > 1 else ''}"
        rows.append((name, drafts, 0.0))
        if drafts > 1 and gate > 0:
            rows.append((f"{name}, confidence >= {gate:g}", drafts, gate))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.join(experiment.RUNS_DIR, "mtp"))
    parser.add_argument("--steps", type=int, default=600, help="training steps if no checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--prompts-per-domain", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gate", type=float, default=0.5,
                        help="min_draft_confidence of the gated rows (0: no gated rows)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    clock = time.perf_counter if options.clock == "wall" else time.process_time
    model = load_or_train(options.checkpoint, options.steps, options.seed)
    D = len(model.mtp)
    _, val_corpus = data_lib.build_corpus(experiment.CORPUS_TOKENS, seed=options.seed).split(0.05)
    by_domain = experiment.domain_prompts(val_corpus, options.prompt_len, options.prompts_per_domain)
    prompts = [(domain, p) for domain, ps in by_domain.items() for p in ps]
    n = options.new_tokens
    model.generate(prompts[0][1], 8)  # warm-up
    speculative_generate(model, prompts[0][1], 8)

    rows = variants(D, options.gate)
    seconds = defaultdict(list)  # name (or (name, domain)) -> one total per repeat
    tokens_per_forward = defaultdict(list)
    first = defaultdict(lambda: [0, 0])  # (name, domain) -> [accepted, proposed] first drafts
    bar = progress(options.repeats * len(prompts), "speculative", unit="prompt")
    for _ in range(options.repeats):
        totals = defaultdict(float)
        for domain, prompt in prompts:
            bar.update(1)
            started = clock()
            reference = model.generate(prompt, n)
            elapsed = clock() - started
            totals["plain"] += elapsed
            totals["plain", domain] += elapsed
            for name, drafts, gate in rows:
                started = clock()
                ids, stats = speculative_generate(model, prompt, n, num_draft_tokens=drafts,
                                                  min_draft_confidence=gate)
                elapsed = clock() - started
                totals[name] += elapsed
                totals[name, domain] += elapsed
                assert torch.equal(ids, reference), "speculative output differs from greedy"
                tokens_per_forward[name].append(stats.tokens_per_forward)
                first[name, domain][0] += stats.accepted[0]
                first[name, domain][1] += stats.proposed[0]
        for name, total in totals.items():
            seconds[name].append(total)
    bar.close()
    plain = statistics.median(seconds["plain"])
    generated = len(prompts) * n
    print(f"batch 1, greedy, {len(prompts)} prompts x {n} new tokens, {options.threads} "
          f"thread(s), {options.clock} clock, median of {options.repeats}; outputs identical "
          "to plain greedy decoding\n")
    print("| decoding | tokens/s | speed-up | tokens per main pass | first-draft acceptance |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain | {generated / plain:.1f} | 1.00x | 1.00 | - |")
    for name, _, _ in rows:
        total = statistics.median(seconds[name])
        accepted = sum(first[name, d][0] for d in by_domain)
        proposed = sum(first[name, d][1] for d in by_domain)
        print(f"| {name} | {generated / total:.1f} | {plain / total:.2f}x | "
              f"{statistics.mean(tokens_per_forward[name]):.2f} | {accepted / proposed:.3f} |")
    name = rows[0][0]  # one draft: the acceptance of module 1, domain by domain
    print(f"\nby domain: first-draft acceptance ({name}) and speed-up of each decoding")
    print("| | " + " | ".join(by_domain) + " |")
    print("|---|" + "---:|" * len(by_domain))
    print("| first-draft acceptance | " + " | ".join(
        f"{first[name, d][0] / max(1, first[name, d][1]):.3f}" for d in by_domain) + " |")
    for name, _, _ in rows:
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(seconds['plain', d]) / statistics.median(seconds[name, d]):.2f}x"
            for d in by_domain) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
