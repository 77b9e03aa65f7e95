"""Sphinx settings shared by both editions of the minimoe book (book/conf.py, book/ar/conf.py).

Build with `python -m minimoe.book`, which stages the sources (see minimoe/book.py). Nothing
here may load a page element from the network: MathJax is served from _static/mathjax,
fonts are the reader's own, and myst-nb's widget scripts (a CDN by default) are off.
"""

project = "minimoe"
author = "the minimoe authors"
copyright = "the minimoe authors, MIT licence"

extensions = ["myst_nb", "sphinx.ext.mathjax"]

# MyST: $...$ and $$...$$ math as in the notebooks, ::: fences, definition lists, and anchors
# for headings down to ### so that chapters can link to a section.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The notebooks are read with their committed outputs; nbval executes them, the book never does.
nb_execution_mode = "off"
nb_ipywidgets_js = {}  # the default loads require.js and the widget manager from CDNs
nb_merge_streams = True

# MathJax 3 from the site itself (copied by minimoe.book from sphinx-mathjax-offline).
mathjax_path = "mathjax/tex-chtml.js"

exclude_patterns = ["_build", "generated", "**.ipynb_checkpoints", "_templates"]

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["book.css"]
html_title = "minimoe"
html_last_updated_fmt = None
html_show_sourcelink = False
html_copy_source = False
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
}
