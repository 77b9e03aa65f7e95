"""IPython extension of the student edition: a cell waiting for an exercise says so.

``%load_ext minimoe.classroom.notebook`` (the first code cell of every student-edition
notebook) installs a handler for the errors of a cell. A cell that reaches a
stub prints which exercise it needs, instead of a traceback; once one has, a later cell that
fails (a name, a dict entry the waiting cell never made) prints its error in one line and
the exercises it probably waits for. Before any unsolved exercise, errors show their usual
traceback. Once the exercise is solved (restart the kernel), the cells
run as in the reference.
"""

from __future__ import annotations

import re

# the stub's message, also inside a wrapping error (Triton's interpreter wraps it)
UNSOLVED = re.compile(r"Exercise (\d+): ([^\n]*?)\. Hint: ")
_waiting: list[str] = []  # exercises this kernel has met unsolved
_reported = [False]  # the running cell's error was reported as waiting for an exercise


def _show_usual_traceback(shell, etype, value, tb, tb_offset):
    shell._showtraceback(etype, value, shell.InteractiveTB.structured_traceback(
        etype, value, tb, tb_offset=tb_offset))


def _handler(shell, etype, value, tb, tb_offset=None):
    match = UNSOLVED.search(f"{etype.__name__}: {value}")
    if match:
        label = f"Exercise {match.group(1)}: {match.group(2)}"
        if label not in _waiting:
            _waiting.append(label)
        print(f"[waiting for {label}] This cell needs an exercise you have not solved yet. "
              f"Write it (EXERCISES.md says where), check it with "
              f"`python -m minimoe.classroom grade . --only <id>`, restart the kernel and run again.")
    elif _waiting:
        # an earlier cell stopped at a stub, so names, dict entries or results it was to make
        # are missing (NameError, KeyError, ...): say so, with the error in one line
        print(f"[waiting for {', '.join(_waiting)}] This cell failed with {etype.__name__}: "
              f"{value}, most likely because an earlier cell waits for that exercise.")
    else:
        _show_usual_traceback(shell, etype, value, tb, tb_offset)
        return None
    _reported[0] = True
    return None


def _clear_reported_error(result) -> None:
    """A cell that only waits for an exercise ends without error, so "Run all" goes on."""
    if _reported[0]:
        result.error_in_exec = None
        _reported[0] = False


def load_ipython_extension(shell) -> None:
    shell.set_custom_exc((Exception,), _handler)
    shell.events.register("post_run_cell", _clear_reported_error)
