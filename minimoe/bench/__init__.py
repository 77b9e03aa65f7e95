"""Benchmark scripts that print tables (speed targets live here, not in timed tests).

Files a benchmark writes (csv, markdown, figures) go under ``runs/bench/NAME/`` unless
``--out`` (or ``--figure-dir``) says otherwise; ``--publish`` writes the committed copies the
notebooks and the README show (``notebooks/results/``, ``figures/``). Each shows a progress
bar with the estimated time left on stderr; its tables go to stdout.
"""

import os

from minimoe.experiments import progress  # noqa: F401  (one progress bar for every script)

RUNS_ROOT = os.path.join("runs", "bench")


def results_dir(name: str) -> str:
    """runs/bench/NAME: where benchmark NAME writes unless told otherwise."""
    return os.path.join(RUNS_ROOT, name)
