"""Run Python on a student's copy without installing it: the environment that imports it.

``student_environment(root, scratch)`` returns os.environ plus PYTHONPATH = [a folder holding a
sitecustomize module, root]. Every Python process started with it (pytest, its xdist workers,
the notebook kernels nbval starts) imports ``minimoe`` from root -- PYTHONPATH comes before
any installed copy -- and, through the sitecustomize's finder, ``minimoe.kernels`` from
root/kernels (pyproject's package-dir mapping, which only an install would set up). The
classroom checks use it to test a student edition with the reference's environment.
"""

from __future__ import annotations

import os
import pathlib

SITECUSTOMIZE = '''"""Import minimoe.kernels from $MINIMOE_STUDENT_ROOT/kernels (minimoe.classroom.environment)."""
import importlib.abc
import importlib.util
import os
import sys

_ROOT = os.environ.get("MINIMOE_STUDENT_ROOT")


class _StudentKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "minimoe.kernels" or not _ROOT:
            return None
        folder = os.path.join(_ROOT, "kernels")
        return importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


sys.meta_path.insert(0, _StudentKernels())
'''


def student_environment(root, scratch) -> dict:
    root, scratch = pathlib.Path(root).resolve(), pathlib.Path(scratch)
    shim = scratch / "minimoe_student_shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, MINIMOE_STUDENT_ROOT=str(root), PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(root)])
    return env
