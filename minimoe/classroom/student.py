"""Solution regions -> stubs, and the student edition of the whole repository.

A region is the lines strictly between ``# BEGIN SOLUTION <id>`` and ``# END SOLUTION``
(each marker alone on its line). ``stub_source`` replaces a region and its two markers by::

    # Exercise N (<id>): write this part (the tests: tests/exercises/).
    raise NotImplementedError("Exercise N: title. Hint: ...")

at the BEGIN line's indentation, so a region inside a function body keeps the module
importable. ``write_student_edition`` copies the repository's files (git's list: tracked and
untracked-but-not-ignored), stubs every region in .py files and notebook code cells, leaves
out ``LEFT_OUT`` (the teacher's own tests, the classroom's checks), and adapts the notebooks and pyproject.toml
so that work waiting for an exercise says so (see the package docstring). The output depends
on the input files only: running it twice gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import stat
import subprocess

from minimoe.classroom.exercises import BY_ID, EXERCISES, stub_message

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION (?P<id>[a-z0-9-]+)[ \t]*$")
END = re.compile(r"^[ \t]*# END SOLUTION[ \t]*$")
PRIVATE_TESTS = "tests/classroom_private"  # the teacher's tests: never in the student edition
# also left out: the classroom's own checks, which need the reference's solutions and git
LEFT_OUT = (PRIVATE_TESTS + "/", "tests/test_classroom.py")
EDITION_MARK = ".minimoe-student-edition"  # written into OUT; lets a later run replace OUT
NOTEBOOK_EXTENSION = ("# student edition: a cell waiting for an unsolved exercise says so\n"
                      "%load_ext minimoe.classroom.notebook")
PLUGIN_OPTION = "-p minimoe.classroom.pytest_plugin"


class MarkerError(ValueError):
    """A malformed solution region (unclosed, nested, unknown id)."""


def find_regions(text: str, where: str) -> list[tuple[int, int, str, str]]:
    """[(begin line, end line, exercise id, indentation)], 0-based line numbers of the markers."""
    regions, open_region = [], None
    for number, line in enumerate(text.split("\n")):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if open_region is not None:
                raise MarkerError(f"{where}:{number + 1}: BEGIN SOLUTION inside the region opened "
                                  f"at line {open_region[0] + 1}")
            if begin["id"] not in BY_ID:
                raise MarkerError(f"{where}:{number + 1}: unknown exercise id {begin['id']!r}; "
                                  f"known: {', '.join(BY_ID)}")
            open_region = (number, begin["id"], begin["indent"])
        elif end:
            if open_region is None:
                raise MarkerError(f"{where}:{number + 1}: END SOLUTION without a BEGIN SOLUTION")
            regions.append((open_region[0], number, open_region[1], open_region[2]))
            open_region = None
    if open_region is not None:
        raise MarkerError(f"{where}:{open_region[0] + 1}: BEGIN SOLUTION {open_region[1]} is never closed")
    return regions


def stub_source(text: str, where: str) -> str:
    """``text`` with every solution region replaced by its stub (unchanged if it has none)."""
    regions = find_regions(text, where)
    if not regions:
        return text
    lines = text.split("\n")
    for begin, end, exercise_id, indent in reversed(regions):
        exercise = BY_ID[exercise_id]
        stub = [f"{indent}# Exercise {exercise.number} ({exercise.id}): write this part; "
                f"check it with: python -m minimoe.classroom grade . --only {exercise.id}",
                f"{indent}raise NotImplementedError({stub_message(exercise)!r})"]
        lines[begin:end + 1] = stub
    return "\n".join(lines)


def repository_files(root: pathlib.Path) -> list[str]:
    """The repository's files as git lists them (tracked, plus untracked ones not ignored)."""
    try:
        listing = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"{root} must be a git checkout of minimoe (git ls-files failed: {error})")
    names = sorted({name for name in listing.decode().split("\0") if name})
    return [name for name in names if (root / name).is_file() and not name.startswith(LEFT_OUT)]


def solution_regions(root: pathlib.Path) -> dict[str, list[str]]:
    """{exercise id: ['file:line', ...]} over the repository's .py files and notebooks."""
    found: dict[str, list[str]] = {exercise.id: [] for exercise in EXERCISES}
    for name in repository_files(root):
        if name.endswith(".py"):
            texts = [(name, (root / name).read_text(encoding="utf-8"))]
        elif name.endswith(".ipynb"):
            cells = json.loads((root / name).read_text(encoding="utf-8"))["cells"]
            texts = [(f"{name}[cell {i}]", "".join(cell["source"])) for i, cell in enumerate(cells)
                     if cell["cell_type"] == "code"]
        else:
            continue
        for where, text in texts:
            for begin, _, exercise_id, _ in find_regions(text, where):
                found[exercise_id].append(f"{where}:{begin + 1}")
    return found


def _student_notebook(text: str, where: str) -> str:
    """Stub code cells; the first code cell loads the extension that reports unsolved exercises."""
    notebook = json.loads(text)
    first = True
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = stub_source("".join(cell["source"]), f"{where}[cell {index}]")
        if first:
            source = NOTEBOOK_EXTENSION + "\n" + source
            first = False
        cell["source"] = source.splitlines(keepends=True)
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def _student_pyproject(text: str) -> str:
    """Notebook outputs are not compared (a student's differ); the plugin reports unsolved work."""
    if '--nbval ' not in text or "addopts = \"" not in text:
        raise MarkerError("pyproject.toml: expected addopts with --nbval to adapt for the student edition")
    text = text.replace("--nbval ", "--nbval-lax ", 1)
    return text.replace('addopts = "', f'addopts = "{PLUGIN_OPTION} ', 1)


def student_text(name: str, text: str) -> str:
    if name.endswith(".py"):
        return stub_source(text, name)
    if name.endswith(".ipynb"):
        return _student_notebook(text, name)
    if name == "pyproject.toml":
        return _student_pyproject(text)
    return text


def _prepare_output(out: pathlib.Path) -> None:
    """OUT must be new, empty, or an earlier student edition (which is replaced)."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"OUT {out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / EDITION_MARK).is_file():
                raise FileExistsError(f"OUT {out} is not empty and holds no earlier student edition "
                                      f"({EDITION_MARK}); choose a new folder")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_student_edition(root: pathlib.Path, out: pathlib.Path) -> dict:
    """Write the student edition of the repository at ``root`` into ``out``; returns a summary."""
    root, out = root.resolve(), out.resolve()
    if out == root or (root in out.parents and not _ignored(root, out)):
        # inside the repository, git would list it and the next edition would copy it
        raise ValueError(f"OUT {out} must lie outside the repository {root} (or in an ignored folder)")
    regions = solution_regions(root)
    missing = [exercise_id for exercise_id, places in regions.items() if not places]
    if missing:
        raise MarkerError(f"no solution region for exercise(s) {', '.join(missing)}")
    _prepare_output(out)
    names = repository_files(root)
    for name in names:
        source = root / name
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith((".py", ".ipynb")) or name == "pyproject.toml":
            target.write_text(student_text(name, source.read_text(encoding="utf-8")), encoding="utf-8")
        else:
            target.write_bytes(source.read_bytes())
        executable = os.stat(source).st_mode & stat.S_IXUSR
        target.chmod(0o755 if executable else 0o644)
    (out / EDITION_MARK).write_text("minimoe student edition: generated by "
                                    "`python -m minimoe.classroom student`; do not edit this file\n")
    (out / "EXERCISES.md").write_text(exercise_sheet(regions), encoding="utf-8")
    return {"files": len(names), "regions": sum(len(p) for p in regions.values()),
            "exercises": len(EXERCISES)}


def _ignored(root: pathlib.Path, path: pathlib.Path) -> bool:
    result = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(path)])
    return result.returncode == 0


def exercise_sheet(regions: dict[str, list[str]]) -> str:
    """EXERCISES.md of the student edition: what to write where, and how to check it."""
    lines = ["# Exercises", "",
             "Each exercise is a `raise NotImplementedError(\"Exercise N: ...\")` in the package: "
             "replace it with your code. Check one exercise with "
             "`python -m minimoe.classroom grade . --only <id>` (a score table, as your teacher's "
             "grader prints it); all of them with `python -m minimoe.classroom grade .`; the "
             "tests themselves are in `tests/exercises/`. Until an exercise is solved, the tests and "
             "notebook cells that need it report `needs Exercise N` instead of failing.", "",
             "| # | id | title | points | where | notebook |", "|---|---|---|---|---|---|"]
    for exercise in EXERCISES:
        places = ", ".join(f"`{name}`" for name in dict.fromkeys(
            place.split(":")[0] for place in regions[exercise.id]))
        lines.append(f"| {exercise.number} | `{exercise.id}` | {exercise.title} | {exercise.points} "
                     f"| {places} | {exercise.notebook} |")
    lines += ["", "## Hints", ""]
    lines += [f"{exercise.number}. **{exercise.title}**: {exercise.hint}" for exercise in EXERCISES]
    return "\n".join(lines) + "\n"
