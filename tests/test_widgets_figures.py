"""`python -m minimoe.figures` redraws the figures from committed results, the same way
every time, and every figure the README and the notebooks reference exists."""

import glob
import json
import os
import re
import subprocess
import sys

from minimoe import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def referenced_figures() -> set[str]:
    """figures/NAME.png that the README and the notebooks show: markdown images, <img> tags,
    and the os.path.join("..", "figures", NAME) paths that notebook code displays. (Prose
    that names a file a GPU benchmark writes elsewhere is not a figure shown.)"""
    texts = [open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()]
    for path in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")):
        cells = json.load(open(path, encoding="utf-8"))["cells"]
        texts += ["".join(cell["source"]) for cell in cells]
    names = set()
    for text in texts:
        names |= set(re.findall(r"!\[[^\]]*\]\((?:\.\./)?figures/([\w.-]+\.png)\)", text))
        names |= set(re.findall(r"<img[^>]+src=\"(?:\.\./)?figures/([\w.-]+\.png)\"", text))
        names |= set(re.findall(r"\"figures\",\s*\"([\w.-]+\.png)\"", text))
    return names


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as handle:
        header = handle.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_every_referenced_figure_exists_and_is_accounted_for():
    names = referenced_figures()
    assert {"routing_by_domain.png", "routing_explorer.png", "kv_cache_presets.png"} <= names
    for name in names:
        assert os.path.exists(os.path.join(ROOT, "figures", name)), f"figures/{name} is missing"
    for path in glob.glob(os.path.join(ROOT, "figures", "*.png")):
        name = os.path.basename(path)
        assert name in figures.DRAWN or name in figures.NOT_REDRAWN, \
            f"figures/{name} is neither drawn by minimoe.figures nor listed as not redrawn"


def test_the_command_redraws_the_committed_figures(tmp_path):
    out = tmp_path / "figures"
    run = subprocess.run([sys.executable, "-m", "minimoe.figures", "--figure-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    for name in figures.DRAWN:
        drawn = out / name
        assert drawn.exists(), f"{name} was not drawn"
        # the same picture as the committed one (pixel size; bytes depend on matplotlib's version)
        assert png_size(str(drawn)) == png_size(os.path.join(ROOT, "figures", name)), name
    # deterministic: a second drawing gives the same bytes
    again = tmp_path / "again"
    figures._routing(os.path.join(ROOT, figures.RESULTS_DIR), str(again))
    assert (again / "routing_by_domain.png").read_bytes() == (out / "routing_by_domain.png").read_bytes()
