"""One-command experiments whose results (JSON) are committed and loaded by the notebooks.

Each experiment writes its numbers with ``write_results`` and its figures with
``save_figure``, so every result file and figure is written the same way.
"""

from __future__ import annotations

import json
import os


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
