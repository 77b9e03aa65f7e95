"""The Arabic edition of the minimoe book, right to left (built by `python -m minimoe.book`).

Sphinx has no right-to-left layout of its own: _templates/basic/layout.html puts
lang="ar" dir="rtl" on the <html> element, and _static/rtl.css mirrors what the theme
hard-codes left to right while keeping code, math and tables of numbers left to right.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conf_common import *  # noqa: E402,F401,F403  (the settings both editions share)

language = "ar"
html_title = "minimoe بالعربية"
templates_path = ["_templates"]
html_css_files = ["book.css", "rtl.css"]
