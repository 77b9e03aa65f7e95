"""Benchmark: plain vs speculative (MTP-drafted) greedy decoding, tokens/s at batch 1.

    python -m minimoe.bench.speculative                 # the trained toy of the MTP experiment
    python -m minimoe.bench.speculative --new-tokens 128 --repeats 5 --threads 1

Loads the checkpoint written by ``python -m minimoe.experiments.mtp`` (runs/mtp/mtp; trained
here with the experiment's settings when missing), decodes from one prompt per domain of the
validation corpus, and prints a markdown table of tokens/s: plain ``model.generate``
against ``minimoe.speculative.speculative_generate`` with 1..D drafts per step (from the
trained MTP modules) and with D + 1 (the last module re-applied). Plain and speculative runs alternate and the
median of --repeats is reported, so slow phases of a shared machine hit both alike. Every
speculative output is asserted identical to the plain greedy output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from minimoe import data as data_lib
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.join(experiment.RUNS_DIR, "mtp"))
    parser.add_argument("--steps", type=int, default=600, help="training steps if no checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    model = load_or_train(options.checkpoint, options.steps, options.seed)
    D = len(model.mtp)
    _, val_corpus = data_lib.build_corpus(experiment.CORPUS_TOKENS, seed=options.seed).split(0.05)
    prompts = [p[0] for p in experiment.domain_prompts(val_corpus, options.prompt_len, 1).values()]
    n = options.new_tokens
    model.generate(prompts[0], 8)  # warm-up
    speculative_generate(model, prompts[0], 8)

    draft_counts = list(range(1, D + 2))  # 1..D drafts from trained modules, D+1 re-applies
    seconds = {"plain": []}
    seconds.update({f"speculative, {k} draft{'s' if k > 1 else ''}": [] for k in draft_counts})
    tokens_per_forward = {name: [] for name in seconds}
    acceptance = {name: [] for name in seconds}
    for _ in range(options.repeats):
        for prompt in prompts:
            started = time.perf_counter()
            reference = model.generate(prompt, n)
            seconds["plain"].append(time.perf_counter() - started)
            tokens_per_forward["plain"].append(1.0)
            for drafts in draft_counts:
                name = f"speculative, {drafts} draft{'s' if drafts > 1 else ''}"
                started = time.perf_counter()
                ids, stats = speculative_generate(model, prompt, n, num_draft_tokens=drafts)
                seconds[name].append(time.perf_counter() - started)
                assert torch.equal(ids, reference), "speculative output differs from greedy"
                tokens_per_forward[name].append(stats.tokens_per_forward)
                acceptance[name].append(stats.acceptance_rate[0])
    rounds = len(prompts)
    # total time of one pass over all prompts, median over repeats
    def round_seconds(values):
        return statistics.median(sum(values[r * rounds:(r + 1) * rounds])
                                 for r in range(options.repeats))
    plain = round_seconds(seconds["plain"])
    print(f"batch 1, greedy, {rounds} prompts x {n} new tokens, {options.threads} thread(s), "
          f"median of {options.repeats}; outputs identical to plain greedy decoding\n")
    print("| decoding | tokens/s | speed-up | tokens per main pass | first-draft acceptance |")
    print("|---|---:|---:|---:|---:|")
    for name, values in seconds.items():
        total = round_seconds(values)
        accept = (f"{statistics.mean(acceptance[name]):.3f}" if acceptance[name] else "-")
        print(f"| {name} | {rounds * n / total:.1f} | {plain / total:.2f}x | "
              f"{statistics.mean(tokens_per_forward[name]):.2f} | {accept} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
