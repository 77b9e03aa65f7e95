"""Every code name quoted in the README, the docstrings and comments, and the notebooks' markdown exists.

Prose goes stale silently: a function is renamed, a notebook renumbered, a module moved into a
subpackage, and the sentence that pointed at it still reads well. tests/prose_names.py reads
the prose the way a reader follows it and checks every pointer against the source tree; its
docstring states the rules. A failure lists each stale quote with its file and line (or
notebook cell and line).
"""

import pytest

from prose_names import (ROOT, Prose, check_minimoe_path, package_index, problems_in, prose_files, prose_of,
                         resolve_dotted)


@pytest.mark.parametrize("path", prose_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_names_exist(path):
    stale = [f"  {where}: {problem}" for prose in prose_of(path) for where, problem in problems_in(prose)]
    assert not stale, (f"{len(stale)} quoted name(s) in {path.relative_to(ROOT)} point at nothing "
                       "(the rules: tests/prose_names.py):\n" + "\n".join(stale))


STALE_EXAMPLES = [
    "`minimoe.moe._grouped_mm_loop`",                      # a function that never existed
    "`_grouped_mm_loop`",                                  # the same, bare
    "`minimoe.nonexistent.thing`",                         # a module that does not exist
    "`minimoe.router.Router.no_such_method`",             # a missing member
    "`minimoe.load_pretrained(path, no_such_kwarg=1)`",    # a keyword the function lacks
    "`KVCache.no_such_method`",                            # a missing member on a class
    "`NoSuchClass`",                                       # a CamelCase name we do not define
    "`cfg.no_such_field`",                                 # a missing ModelConfig field
    "`minimoe train --no-such-flag`",                      # a flag no parser accepts
    "`minimoe no-such-command CKPT`",                      # a subcommand the CLI lacks
    "`--set no_such_field=1`",                             # a config field --set cannot set
    "`toy-no-such-preset`",                                # a preset (string) nothing defines
    "`no_such_name[e]`",                                   # a subscripted name
    "`minimoe/no_such_module.py`",                         # a missing file
    "`no_such_module.py`",                                 # a missing file, by its name
    "![figure](figures/no_such_figure.png)",               # a missing image
    "`tests/test_no_such_thing.py`",                       # a missing test file
    "notebook 42 shows it",                                # a missing notebook
    "notebooks 07 and 42 show it",                         # one missing in a list
    "as minimoe.moe.no_such_function shows",               # an unquoted minimoe path
    "```bash\npython -m minimoe.no_such_module\n```",       # a command in a fenced block
    "```bash\n.venv/bin/minimoe train --no-such-flag\n```",  # a flag in a fenced block
    "`42_no_such_notebook`",                               # a missing notebook by name
    "notebook 01, section 99, shows it",                   # a missing section
    "`sizing.no_such_function`",                           # a module-relative name
    "`ModelConfig(no_such_field=1)`",                      # a keyword the class lacks
    '`"no such literal"`',                                 # a string value nothing uses
]
GOOD_EXAMPLES = [
    "`minimoe.moe.dispatch_sorted`", "`dispatch_sorted`", "`minimoe.router.Router`",
    "`minimoe.load_pretrained(path, layers=[0, 1])`", "`KVCache.append`", "`cfg.capacity_factor`",
    "`minimoe train --steps 10`", "`minimoe/moe.py`", "notebook 01, sections 2-5", "`01_moe_layer`",
    "`sizing.count_params`", "`ModelConfig(kernels=\"triton\")`", "`torch._grouped_mm`",
    "`mlp.experts.gate_proj`", "`tests/test_prose_names.py`", "`E = 64`",
    "`attention.query_key_value`", "`python -m minimoe.bench.moe_dispatch`", "`toy-classic`",
    "```bash\n.venv/bin/minimoe train --steps 10\n```", "`gate_proj[e]`", "`--set capacity_factor=1.0`",
]


@pytest.mark.parametrize("text", STALE_EXAMPLES)
def test_checker_reports_stale_names(text):
    assert problems_in(Prose("example", text, 1, ROOT / "notebooks")), f"{text} was not reported"


def test_checker_accepts_live_names():
    found = [p for text in GOOD_EXAMPLES for p in problems_in(Prose("example", text, 1, ROOT / "notebooks"))]
    assert not found, found


def test_checker_follows_new_subpackages(tmp_path):
    """Modules moved into a new subpackage are found, at any depth, without editing the checker."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    package = tmp_path / "minimoe" / "checkpoints"
    package.mkdir(parents=True)
    (tmp_path / "minimoe" / "__init__.py").write_text("from minimoe.checkpoints.load import load_pretrained\n")
    (package / "__init__.py").write_text("from .load import Loader\n")
    (package / "load.py").write_text(
        "class Loader:\n    def __init__(self, folder):\n        self.weight_map = {}\n"
        "    def read(self, name):\n        pass\n\n"
        "def load_pretrained(path, layers=None):\n    return Loader(path)\n")
    index = package_index(tmp_path)
    for live in ("minimoe.checkpoints.load.load_pretrained", "minimoe.load_pretrained",
                 "minimoe.checkpoints.Loader.read", "minimoe.checkpoints.load.Loader.weight_map"):
        assert resolve_dotted(index, live) is not None, live
    for stale in ("minimoe.checkpoint", "minimoe.checkpoints.load.save_pretrained",
                  "minimoe.checkpoints.Loader.write"):
        assert resolve_dotted(index, stale) is None, stale
    assert check_minimoe_path(index, "minimoe.load_pretrained(path, layers=[0])") == []
    assert check_minimoe_path(index, "minimoe.load_pretrained(path, shards=[0])") != []
