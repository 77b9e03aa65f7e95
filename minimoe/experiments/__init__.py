"""One-command experiments whose results (JSON) are committed and loaded by the notebooks.

Each experiment writes its numbers with ``write_results`` and its figures with
``save_figure``, so every result file and figure is written the same way. By default they go
under ``runs/experiments/NAME/`` (a run of yours never replaces the committed results);
``--publish`` writes the committed files the notebooks and the README show
(notebooks/results/NAME.json and ``figures/``), and ``--out`` / ``--figure-dir`` choose
any other place. Every experiment shows a progress bar with the estimated time left.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

RUNS_ROOT = os.path.join("runs", "experiments")
PUBLISHED_RESULTS = os.path.join("notebooks", "results")
PUBLISHED_FIGURES = "figures"


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """--out, --figure-dir and --publish for experiment ``name``."""
    default_dir = os.path.join(RUNS_ROOT, name)
    parser.add_argument("--out", default=None, help="results JSON (default: "
                        f"{os.path.join(default_dir, name + '.json')}; with --publish: "
                        f"{os.path.join(PUBLISHED_RESULTS, name + '.json')})")
    parser.add_argument("--figure-dir", default=None, help=f"figures (default: {default_dir}; "
                        f"with --publish: {PUBLISHED_FIGURES}/)")
    parser.add_argument("--publish", action="store_true", help="write the committed results "
                        "and figures that the notebooks and the README show")


def output_paths(options: argparse.Namespace, name: str) -> tuple[str, str]:
    """(results JSON path, figure folder) from --out / --figure-dir / --publish."""
    if options.publish:
        results, figures = os.path.join(PUBLISHED_RESULTS, f"{name}.json"), PUBLISHED_FIGURES
    else:
        results = os.path.join(RUNS_ROOT, name, f"{name}.json")
        figures = os.path.join(RUNS_ROOT, name)
    return options.out or results, options.figure_dir or figures


def progress(total: int, desc: str, unit: str = "step", disable: Optional[bool] = None):
    """A tqdm bar on stderr (count, rate, estimated time left); the tables stay on stdout."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable)


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Lay out, save (creating the folder) and close a matplotlib figure; returns the path."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt  # only experiments that plot need matplotlib

    plt.close(fig)
    return path


def write_results(results: dict, path: str) -> None:
    """Write an experiment's results as JSON (creating the folder)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)
