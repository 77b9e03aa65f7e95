"""The English edition of the minimoe book (built by `python -m minimoe.book`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "_ext"))
from conf_common import *  # noqa: E402,F401,F403  (the settings both editions share)

language = "en"
# inline code naming a module (`minimoe.router`, `minimoe/balance.py`) links to its code page
extensions = extensions + ["code_links"]  # noqa: F405
