"""The English edition of the minimoe book (built by `python -m minimoe.book`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conf_common import *  # noqa: E402,F401,F403  (the settings both editions share)

language = "en"
