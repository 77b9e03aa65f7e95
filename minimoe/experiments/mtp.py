"""Experiment: what multi-token prediction buys -- in training, and as a draft model.

(a) Training. Two twins train on the same synthetic corpus with the same seed, batch and
    number of steps (the `toy` preset, 600 steps like the balance experiment):

        no-mtp   num_nextn_predict_layers = 0: only the next-token loss
        mtp      num_nextn_predict_layers = 2: D = 2 MTP modules, loss weight lambda 0.3,
                 switched to 0.1 for the last third of the steps (V3: 0.3 for the first
                 10T of 14.8T tokens, then 0.1)

    Compared: the *main model's* validation cross-entropy (nats per byte). The MTP modules
    are extra parameters and compute in training, but the main model is the same size.

(b) Decoding. The trained mtp twin decodes greedily at batch 1 on the CPU, plainly
    (``model.generate``) and speculatively with its MTP modules as drafters
    (``minimoe.speculative``), from prompts taken from each domain of the validation
    corpus. Reported: acceptance of each draft position (overall and per domain), mean
    accepted length, tokens per main-model pass, tokens per second and the speed-up; a
    third draft made by re-applying the last module is reported separately. The outputs
    are asserted identical.

One command regenerates the committed results (about 11 minutes on one thread):

    python -m minimoe.experiments.mtp --publish

It writes runs/experiments/mtp/ (``--publish``: the committed notebooks/results/mtp.json and
figures/mtp_*.png) and its own checkpoints under runs/mtp/, replaced on every run
(``--decode-only`` reuses them).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from minimoe import data as data_lib
from minimoe.experiments import (add_output_arguments, output_paths, progress, save_figure,
                                 write_results)
from minimoe.speculative import speculative_generate
from minimoe.train import TrainArgs, load_checkpoint, train

RUNS = {"no-mtp": 0, "mtp": 2}
RUNS_DIR = os.path.join("runs", "mtp")
CORPUS_TOKENS = TrainArgs().corpus_tokens


def train_args(name: str, steps: int, seed: int) -> TrainArgs:
    depth = RUNS[name]
    return TrainArgs(preset="toy", config_overrides={"num_nextn_predict_layers": depth},
                     steps=steps, seed=seed, out_dir=os.path.join(RUNS_DIR, name),
                     eval_every=max(1, steps // 10), progress=False, save=True,
                     overwrite=True,  # runs/mtp/ belongs to this experiment
                     mtp_weight_switch_step=(2 * steps) // 3 if depth else None,
                     mtp_loss_weight_after=0.1)


def run_training(name: str, steps: int, seed: int, on_step=None) -> dict:
    args = train_args(name, steps, seed)
    started = time.perf_counter()
    model, history, _ = train(args, on_step=on_step)
    seconds = time.perf_counter() - started
    result = {"num_nextn_predict_layers": RUNS[name], "parameters": model.num_parameters(),
              "seconds": seconds, "step": [h["step"] for h in history],
              "ce": [h["ce"] for h in history],
              "val_step": [h["step"] for h in history if "val_loss" in h],
              "val_loss": [h["val_loss"] for h in history if "val_loss" in h]}
    for k in range(1, RUNS[name] + 1):
        result[f"mtp_ce_{k}"] = [h[f"mtp_ce_{k}"] for h in history]
    if RUNS[name]:
        result["mtp_loss_weight"] = [h["mtp_loss_weight"] for h in history]
    return result


def domain_prompts(corpus, prompt_len: int, per_domain: int) -> dict:
    """{domain: [prompt (1, prompt_len) long, ...]}: windows lying inside one domain's text."""
    prompts = {}
    domains = corpus.domains.long()
    for index, name in enumerate(corpus.domain_names):
        inside = (domains == index).int()
        # a window [s, s+prompt_len) is in the domain when its sum of indicators is full
        sums = torch.nn.functional.conv1d(inside[None, None].float(),
                                          torch.ones(1, 1, prompt_len))[0, 0]
        starts = torch.nonzero(sums == prompt_len).flatten()
        chosen = starts[torch.linspace(0, len(starts) - 1, per_domain).long()]
        prompts[name] = [corpus.tokens[s:s + prompt_len].long()[None] for s in chosen.tolist()]
    return prompts


def decode_comparison(model, prompts: dict, new_tokens: int, num_draft_tokens=None,
                      repeats: int = 3) -> dict:
    """Greedy plain vs speculative decoding on every prompt; identical outputs asserted."""
    plain_seconds = speculative_seconds = 0.0
    per_domain, generated = {}, 0
    totals = None
    bar = progress(sum(len(p) for p in prompts.values()), "mtp: decoding", unit="prompt")
    for name, domain_prompts_ in prompts.items():
        accepted = proposed = 0
        for prompt in domain_prompts_:
            bar.update(1)
            # the fastest of `repeats` alternating runs: robust to other work on the machine
            plain_times, speculative_times = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                reference = model.generate(prompt, new_tokens)
                plain_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                ids, stats = speculative_generate(model, prompt, new_tokens,
                                                  num_draft_tokens=num_draft_tokens)
                speculative_times.append(time.perf_counter() - started)
            plain_seconds += min(plain_times)
            speculative_seconds += min(speculative_times)
            if not torch.equal(ids, reference):
                raise AssertionError(f"speculative output differs from greedy ({name})")
            generated += stats.new_tokens
            accepted += stats.accepted[0]
            proposed += stats.proposed[0]
            if totals is None:
                totals = {"proposed": [0] * len(stats.proposed),
                          "accepted": [0] * len(stats.proposed), "accepted_lengths": [],
                          "main_forwards": 0, "new_tokens": 0}
            for j in range(len(stats.proposed)):
                totals["proposed"][j] += stats.proposed[j]
                totals["accepted"][j] += stats.accepted[j]
            totals["accepted_lengths"] += stats.accepted_lengths
            totals["main_forwards"] += stats.main_forwards
            totals["new_tokens"] += stats.new_tokens
        per_domain[name] = accepted / proposed
    bar.close()
    lengths = totals["accepted_lengths"]
    return {
        "num_draft_tokens": len(totals["proposed"]),
        "acceptance_rate": [a / p for a, p in zip(totals["accepted"], totals["proposed"])],
        "first_draft_acceptance_by_domain": per_domain,
        "mean_accepted_length": sum(lengths) / len(lengths),
        "tokens_per_forward": totals["new_tokens"] / totals["main_forwards"],
        "plain_tokens_per_second": generated / plain_seconds,
        "speculative_tokens_per_second": generated / speculative_seconds,
        "speedup": plain_seconds / speculative_seconds,
    }


def run_decoding(checkpoint: str, prompt_len: int, per_domain: int, new_tokens: int,
                 seed: int) -> dict:
    model = load_checkpoint(checkpoint).eval()
    corpus = data_lib.build_corpus(CORPUS_TOKENS, seed=seed)
    _, val_corpus = corpus.split(0.05)
    prompts = domain_prompts(val_corpus, prompt_len, per_domain)
    D = len(model.mtp)
    model.generate(prompts[val_corpus.domain_names[0]][0], 8)  # warm-up
    result = {"prompt_len": prompt_len, "prompts_per_domain": per_domain,
              "new_tokens": new_tokens, "timing": "fastest of 3 alternating runs per prompt", "modules": decode_comparison(model, prompts, new_tokens),
              "reapplied": decode_comparison(model, prompts, new_tokens, D + 1)}
    return result


def plot(results: dict, figure_dir: str = "figures") -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in results["runs"].items():
        axes[0].plot(run["val_step"], run["val_loss"], marker="o", ms=3, label=name)
    axes[0].set(xlabel="step", ylabel="main-model validation loss (nats/byte)",
                title="Training with and without MTP")
    decode = results["decode"]["modules"]
    names = list(decode["first_draft_acceptance_by_domain"])
    values = [decode["first_draft_acceptance_by_domain"][n] for n in names]
    axes[1].bar(names, values, color="tab:green")
    axes[1].set(ylim=(0, 1), ylabel="acceptance of the first draft",
                title="Greedy drafts accepted, by domain")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    path = save_figure(fig, os.path.join(figure_dir, "mtp_training_acceptance.png"))
    return [path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--prompts-per-domain", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--decode-only", action="store_true",
                        help="reuse the checkpoints under runs/mtp and the training results")
    add_output_arguments(parser, "mtp")
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args(argv)
    results_path, figure_dir = output_paths(options, "mtp")
    torch.set_num_threads(options.threads)
    results = {"command": "python -m minimoe.experiments.mtp", "steps": options.steps,
               "seed": options.seed, "threads": torch.get_num_threads(), "runs": {}}
    if options.decode_only:
        with open(results_path) as handle:
            results["runs"] = json.load(handle)["runs"]
    else:
        bar = progress(len(RUNS) * options.steps, "mtp: training")
        for name in RUNS:
            bar.set_description(f"mtp: training {name}")
            results["runs"][name] = run = run_training(name, options.steps, options.seed,
                                                       on_step=lambda record: bar.update(1))
            bar.write(f"  {name}: {run['parameters'] / 1e6:.2f}M params, final val "
                      f"{run['val_loss'][-1]:.4f}, {run['seconds']:.0f}s")
        bar.close()
    print("decoding (plain vs speculative, every prompt twice) ...", flush=True)
    results["decode"] = run_decoding(os.path.join(RUNS_DIR, "mtp"), options.prompt_len,
                                     options.prompts_per_domain, options.new_tokens,
                                     options.seed)
    print(json.dumps(results["decode"], indent=1), flush=True)
    write_results(results, results_path)
    print("wrote", results_path, *plot(results, figure_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
