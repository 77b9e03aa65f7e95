"""Regenerate every figure the README and the notebooks show, from committed results.

    python -m minimoe.figures                      # writes figures/*.png
    python -m minimoe.figures --figure-dir /tmp/f  # elsewhere (the test does this)

Each figure is drawn by the plot function of the experiment that measured it, from the
JSON that experiment committed under notebooks/results/ (or, for the KV-cache chart, from
the package's presets alone): no training and no timing runs here, so the same commit gives
the same pictures. Two kinds of image are NOT redrawn, and the listing says so:

* measured timings with no committed numbers (mla_decode_time.png: `python -m
  minimoe.bench.mla_decode` measures and draws it on the machine at hand);
* screenshots of the explorers (routing_explorer*.png: the browser tests take them when run
  with MINIMOE_SCREENSHOTS=1; otherwise into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import time

RESULTS_DIR = os.path.join("notebooks", "results")


def _load(results_dir: str, name: str) -> dict:
    path = os.path.join(results_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; it is committed with the repository "
                                "(or rerun the experiment that writes it)")
    with open(path) as handle:
        return json.load(handle)


def _routing(results_dir, figure_dir):
    from minimoe.experiments import routing_by_domain
    return [routing_by_domain.plot(_load(results_dir, "routing_by_domain.json"), figure_dir)]


def _balance(results_dir, figure_dir):
    from minimoe.experiments import balance
    return balance.plot(_load(results_dir, "balance.json"), figure_dir)


def _fp8_accumulation(results_dir, figure_dir):
    from minimoe.experiments import fp8_accumulation
    return fp8_accumulation.plot(_load(results_dir, "fp8_accumulation.json"), figure_dir)


def _fp8_training(results_dir, figure_dir):
    from minimoe.experiments import fp8_training
    return [fp8_training.plot(_load(results_dir, "fp8_training.json"),
                              os.path.join(figure_dir, "fp8_training.png"))]


def _long_context(results_dir, figure_dir):
    from minimoe.experiments import long_context
    return long_context.plot(_load(results_dir, "long_context.json"), figure_dir)


def _mtp(results_dir, figure_dir):
    from minimoe.experiments import mtp
    return mtp.plot(_load(results_dir, "mtp.json"), figure_dir)


def _kv_cache(results_dir, figure_dir):
    from minimoe.bench.mla_decode import plot_kv_presets
    path = os.path.join(figure_dir, "kv_cache_presets.png")
    plot_kv_presets(path)
    return [path]


# figure file -> the function that draws it (some draw two files)
DRAWN = {
    "routing_by_domain.png": _routing,
    "balance_loss_maxvio.png": _balance,
    "fp8_accumulation.png": _fp8_accumulation,
    "fp8_scaling_error.png": _fp8_accumulation,
    "fp8_training.png": _fp8_training,
    "long_context.png": _long_context,
    "mtp_training_acceptance.png": _mtp,
    "kv_cache_presets.png": _kv_cache,
}
NOT_REDRAWN = {
    "mla_decode_time.png": "a timing measured by `python -m minimoe.bench.mla_decode`",
    "routing_explorer.png": "a screenshot: MINIMOE_SCREENSHOTS=1 pytest -n 0 tests/test_browser.py",
    "routing_explorer_jupyterlab.png": "a screenshot in JupyterLab: MINIMOE_SCREENSHOTS=1 pytest -n 0 tests/test_browser.py",
    "book_en.png": "a screenshot of the book: `python -m minimoe.book --screenshots`",
    "book_ar.png": "a screenshot of the Arabic edition: `python -m minimoe.book --screenshots`",
}


def regenerate(figure_dir: str = "figures", results_dir: str = RESULTS_DIR) -> list[str]:
    """Draw every figure of DRAWN into figure_dir; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(figure_dir, exist_ok=True)
    written: list[str] = []
    for draw in dict.fromkeys(DRAWN.values()):  # each function once, in order
        written += [os.fspath(p) for p in draw(results_dir, figure_dir)]
        plt.close("all")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure-dir", default="figures")
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    options = parser.parse_args(argv)
    start = time.perf_counter()
    for path in regenerate(options.figure_dir, options.results_dir):
        print("wrote", path)
    for name, why in NOT_REDRAWN.items():
        print(f"kept  {os.path.join(options.figure_dir, name)} ({why})")
    print(f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
