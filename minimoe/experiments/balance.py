"""Experiment: how should an MoE keep its experts balanced? (results for notebook 02)

Five twins train on the same synthetic corpus, with the same seed, batch and number of
steps; only the balancing (or the sparsity) differs:

    aux-free     the `toy` preset: sigmoid router, selection-only expert bias updated by
                 b_i += gamma * sign(mean load - load_i) (gamma = 1e-3), plus DeepSeek-V3's
                 tiny sequence-wise auxiliary loss (alpha = 1e-4)      [DeepSeek-V3 §2.1.2]
    aux-loss     the same sigmoid router, no bias, a Switch/GShard auxiliary loss (alpha 1e-2)
    classic      `toy-classic`: softmax router + auxiliary loss (alpha 1e-2) [Switch, GShard]
    unbalanced   the sigmoid router with no balancing at all (the failure mode)
    dense        `toy-dense`: no experts; an FFN as wide as the MoE's *activated* FFN width
                 (shared + top-k routed), so every twin spends about the same FLOPs per token

Measured: training loss, validation loss, MaxVio per MoE layer over training (Wang et al.
2024: (max load - mean load) / mean load; 0 = perfectly balanced) and, at the end, the
mutual information between a token's domain and its experts (``minimoe.viz``).

One command regenerates the committed results (about 15 minutes on 2 CPU cores):

    python -m minimoe.experiments.balance --publish

It writes runs/experiments/balance/ (results JSON and figures); ``--publish`` writes the
committed notebooks/results/balance.json and figures/balance_*.png.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from minimoe import data as data_lib
from minimoe.experiments import (add_output_arguments, output_paths, progress, save_figure,
                                 write_results)
from minimoe.train import TrainArgs, train
from minimoe.viz import routing_report

RUNS = {
    "aux-free": ("toy", {}),
    "aux-loss": ("toy", dict(use_expert_bias=False, bias_update_rate=0.0, seq_aux_loss_alpha=0.0,
                             aux_loss_alpha=1e-2)),
    "classic": ("toy-classic", {}),
    "unbalanced": ("toy", dict(use_expert_bias=False, bias_update_rate=0.0,
                               seq_aux_loss_alpha=0.0)),
    "dense": ("toy-dense", {}),
}



def run_one(name: str, steps: int, seed: int, out_root: str, on_step=None) -> dict:
    preset, overrides = RUNS[name]
    args = TrainArgs(preset=preset, config_overrides=overrides, steps=steps, seed=seed,
                     out_dir=os.path.join(out_root, name), eval_every=max(1, steps // 10),
                     progress=False, save=False)
    started = time.perf_counter()
    model, history, (_, val_corpus) = train(args, on_step=on_step)
    seconds = time.perf_counter() - started
    result = {
        "preset": preset, "overrides": overrides,
        "parameters": model.num_parameters(),
        "seconds": seconds,
        "step": [h["step"] for h in history],
        "ce": [h["ce"] for h in history],
        "max_vio": [h["max_vio"] for h in history],
        "max_vio_by_layer": {layer: [h["max_vio_by_layer"][layer] for h in history]
                             for layer in history[-1]["max_vio_by_layer"]},
        "val_step": [h["step"] for h in history if "val_loss" in h],
        "val_loss": [h["val_loss"] for h in history if "val_loss" in h],
    }
    if model.cfg.is_moe:
        x, _, domains = next(data_lib.iterate_eval_batches(val_corpus, 32, args.seq_len))
        report = routing_report(model, x, domains, val_corpus.domain_names)
        result["mutual_information"] = {layer: info["mutual_information"]
                                        for layer, info in report["layers"].items()}
        result["usage"] = {layer: info["usage"].tolist() for layer, info in report["layers"].items()}
        result["domain_names"] = list(val_corpus.domain_names)
    return result


def plot(results: dict, figure_dir: str = "figures") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, result in results["runs"].items():
        axes[0].plot(result["val_step"], result["val_loss"], marker="o", ms=3, label=name)
        if result["max_vio"] and name != "dense":
            window = 10
            smooth = [sum(result["max_vio"][max(0, i - window + 1): i + 1])
                      / len(result["max_vio"][max(0, i - window + 1): i + 1])
                      for i in range(len(result["max_vio"]))]
            axes[1].plot(result["step"], smooth, label=name)
    axes[0].set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss")
    axes[1].set(xlabel="step", ylabel="MaxVio (mean over MoE layers)",
                title="Load imbalance (MaxVio, 10-step mean)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    paths.append(save_figure(fig, os.path.join(figure_dir, "balance_loss_maxvio.png")))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    add_output_arguments(parser, "balance")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args(argv)
    results_path, figure_dir = output_paths(options, "balance")
    if options.threads:
        torch.set_num_threads(options.threads)
    results = {"command": "python -m minimoe.experiments.balance", "steps": options.steps,
               "seed": options.seed, "threads": torch.get_num_threads(), "runs": {}}
    bar = progress(len(options.runs) * options.steps, "balance")
    for name in options.runs:
        bar.set_description(f"balance: {name}")
        results["runs"][name] = run_one(name, options.steps, options.seed, "runs/balance",
                                        on_step=lambda record: bar.update(1))
        r = results["runs"][name]
        bar.write(f"  {name}: {r['parameters'] / 1e6:.2f}M params, final val {r['val_loss'][-1]:.4f}, "
              f"final MaxVio {r['max_vio'][-1]:.3f}, {r['seconds']:.0f}s")
    bar.close()
    write_results(results, results_path)
    print("wrote", results_path, *plot(results, figure_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
