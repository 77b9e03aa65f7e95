"""The autograder: the teacher's exercise tests against a student's copy, one subprocess each.

``grade(student_root)`` runs, for every exercise of the registry, the tests marked
``@pytest.mark.exercise(id)`` in the teacher's ``tests/exercises/`` and
``tests/classroom_private/`` (the student's own copies of tests are never used) with
``_grade_runner.py`` in a fresh Python process that imports the student's ``minimoe``. Each
exercise has a wall-clock limit; an exercise earns its points when all its tests pass (at
least one must run). ``format_table`` prints the score table; ``write_json`` the LMS records
(id, title, points, earned, passed, message).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from minimoe.classroom.exercises import EXERCISES, Exercise
from minimoe.classroom.student import PRIVATE_TESTS

REFERENCE_ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = pathlib.Path(__file__).with_name("_grade_runner.py")


def test_files(reference_root: pathlib.Path = REFERENCE_ROOT) -> list[pathlib.Path]:
    """The teacher's exercise test files: tests/exercises/ then tests/classroom_private/."""
    files = []
    for folder in ("tests/exercises", PRIVATE_TESTS):
        files += sorted((reference_root / folder).glob("test_*.py"))
    if not files:
        raise FileNotFoundError(f"no exercise tests under {reference_root}/tests/exercises: "
                                f"grade from a checkout of the reference")
    return files


def grade_one(exercise: Exercise, student_root: pathlib.Path, files: list, timeout: float) -> dict:
    record = {"id": exercise.id, "number": exercise.number, "title": exercise.title,
              "points": exercise.points, "earned": 0, "passed": False, "message": ""}
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as scratch:
        result_file = pathlib.Path(scratch) / "result.json"
        command = [sys.executable, str(RUNNER), str(student_root), exercise.id, str(result_file),
                   str(REFERENCE_ROOT / "pyproject.toml"), *map(str, files)]
        start = time.monotonic()
        try:
            finished = subprocess.run(command, cwd=scratch, env=env, capture_output=True,
                                      text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            record["message"] = f"timed out after {timeout:.0f} s"
            return record
        record["seconds"] = round(time.monotonic() - start, 1)
        results = json.loads(result_file.read_text()) if result_file.is_file() else None
    if results is None:
        tail = (finished.stderr or finished.stdout).strip().splitlines()[-3:]
        record["message"] = "the tests could not run: " + " | ".join(tail)
        return record
    failures = [r for r in results if r["outcome"] != "passed"]
    ran = [r for r in results if r["when"] == "call"]
    if not ran and not failures:
        record["message"] = "no test of this exercise ran"
    elif failures:
        first = failures[0]
        reason = first["message"].splitlines()[0] if first["message"] else first["outcome"]
        record["message"] = (f"{reason} ({len(failures)} of {max(len(ran), len(failures))} tests "
                             f"failed; first: {first['nodeid'].split('::')[-1]})")
    else:
        record.update(passed=True, earned=exercise.points, message=f"{len(ran)} tests passed")
    return record


def grade(student_root, timeout: float = 180.0, jobs: int = 1, only=None) -> list[dict]:
    """One record per exercise (registry order) for the copy of minimoe at ``student_root``."""
    student_root = pathlib.Path(student_root).resolve()
    if not (student_root / "minimoe" / "__init__.py").is_file():
        raise FileNotFoundError(f"{student_root} holds no minimoe/__init__.py: pass the root of a "
                                f"student's copy of the repository")
    files = test_files()
    chosen = [e for e in EXERCISES if only is None or e.id in only]

    def run(exercise: Exercise) -> dict:
        # only the files that mention the exercise: collecting the others costs time, not marks
        mine = [f for f in files if f'exercise("{exercise.id}"' in f.read_text(encoding="utf-8")]
        return grade_one(exercise, student_root, mine or files[:1], timeout)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(run, chosen))


def format_table(records: list[dict], width: int = 70) -> str:
    rows = [("#", "exercise", "points", "passed", "message")]
    for r in records:
        message = r["message"] if len(r["message"]) <= width else r["message"][:width - 3] + "..."
        rows.append((str(r["number"]), r["id"], f"{r['earned']}/{r['points']}",
                     "yes" if r["passed"] else "no", message))
    earned, total = sum(r["earned"] for r in records), sum(r["points"] for r in records)
    rows.append(("", "total", f"{earned}/{total}", f"{sum(r['passed'] for r in records)}/{len(records)}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
             for row in rows]
    lines.insert(1, "-" * (sum(widths) + 8 + min(width, max(len(r[4]) for r in rows))))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(line.rstrip() for line in lines)


def write_json(records: list[dict], path) -> None:
    keys = ("id", "title", "points", "earned", "passed", "message")
    pathlib.Path(path).write_text(json.dumps([{k: r[k] for k in keys} for r in records], indent=1) + "\n")
