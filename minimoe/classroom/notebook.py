"""IPython extension of the student edition: a cell waiting for an exercise says so.

``%load_ext minimoe.classroom.notebook`` (the first code cell of every student-edition
notebook) installs a handler for the errors of a cell. A cell that reaches a
stub prints which exercise it needs and where, instead of a traceback; a later cell that uses
a name the waiting cell never defined prints that it waits for the same exercise. Any other
error shows its usual traceback. Once the exercise is solved (restart the kernel), the cells
run as in the reference.
"""

from __future__ import annotations

import re

# the stub's message, also inside a wrapping error (Triton's interpreter wraps it)
UNSOLVED = re.compile(r"NotImplementedError(?:: |\(['\"])Exercise (\d+): ([^.\n]*)")
_waiting: list[str] = []  # exercises this kernel has met unsolved


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
              f"`pytest tests/exercises`, restart the kernel and run again.")
    elif issubclass(etype, NameError) and _waiting:
        print(f"[waiting for {_waiting[-1]}] This cell uses {str(value).split(chr(39))[1:2]} "
              f"from a cell that waits for that exercise.")
    else:
        _show_usual_traceback(shell, etype, value, tb, tb_offset)
    return None


def load_ipython_extension(shell) -> None:
    shell.set_custom_exc((Exception,), _handler)
