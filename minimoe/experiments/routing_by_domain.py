"""Experiment: which experts does each domain use after the README's training run?

The README opens with this picture: the `toy` model (DeepSeek-V3 in miniature) trained by
`minimoe train` for four minutes on the synthetic corpus of prose, code, arithmetic, JSON and
Arabic, then asked, layer by layer, which experts each domain's token-slots go to
(minimoe.viz: usage matrices and the mutual information I(domain; expert) in nats).

One command regenerates the committed statistics (about five minutes on 2 CPU cores when
it has to train; seconds when the run folder exists):

    python -m minimoe.experiments.routing_by_domain            # trains runs/toy if missing
    python -m minimoe.experiments.routing_by_domain --run DIR  # any run folder of `minimoe train`

It writes notebooks/results/routing_by_domain.json and figures/routing_by_domain.png
(`python -m minimoe.figures` redraws the figure from the JSON alone). The evaluation batch
is the first batch of the run's validation split, as `minimoe train` prints it.
"""

from __future__ import annotations

import argparse
import os

import torch

from minimoe import data as data_lib
from minimoe.experiments import write_results
from minimoe.train import TrainArgs, load_checkpoint, train, training_corpora
from minimoe.viz import format_usage_table, plot_domain_usage, routing_report

RESULTS_PATH = os.path.join("notebooks", "results", "routing_by_domain.json")
FIGURE_NAME = "routing_by_domain.png"
EVAL_ROWS = 32


def trained_model(run: str, threads: int | None):
    """The model of `run`, trained there first (the README's `minimoe train`) if missing."""
    if not os.path.exists(os.path.join(run, "model.safetensors")):
        print(f"{run} has no checkpoint: training the toy as `minimoe train` does ...", flush=True)
        if threads:
            torch.set_num_threads(threads)
        train(TrainArgs(out_dir=run, max_minutes=4.0, progress=False))
    return load_checkpoint(run)


def measure(model, seq_len: int = TrainArgs.seq_len) -> dict:
    """Usage matrices and I(domain; expert) per MoE layer, as JSON-ready lists."""
    _, val_corpus = training_corpora(TrainArgs())
    x, _, domains = next(data_lib.iterate_eval_batches(val_corpus, EVAL_ROWS, seq_len))
    report = routing_report(model, x, domains, val_corpus.domain_names)
    print(format_usage_table(report))
    return {
        "domain_names": list(report["domain_names"]),
        "max_mutual_information": report["max_mutual_information"],
        "eval_tokens": int(x.numel()),
        "layers": {name: {"usage": [[round(float(v), 6) for v in row] for row in layer["usage"]],
                          "mutual_information": layer["mutual_information"]}
                   for name, layer in report["layers"].items()},
    }


def plot(results: dict, figure_dir: str = "figures") -> str:
    """figures/routing_by_domain.png from the results alone."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = os.path.join(figure_dir, FIGURE_NAME)
    os.makedirs(figure_dir, exist_ok=True)
    fig = plot_domain_usage(results, path, title=f"{results['model']}: share of each domain's "
                                                 "token-slots per expert")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/toy", help="a run folder of `minimoe train`")
    parser.add_argument("--out", default=RESULTS_PATH)
    parser.add_argument("--figure-dir", default="figures")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args(argv)
    model = trained_model(options.run, options.threads)
    results = {"command": "python -m minimoe.experiments.routing_by_domain",
               "model": model.cfg.name, **measure(model)}
    write_results(results, options.out)
    print("wrote", options.out, plot(results, options.figure_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
