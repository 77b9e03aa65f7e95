"""Build the minimoe book: `python -m minimoe.book` builds both editions and prints their paths.

The book is a Sphinx site (myst-nb reads the notebooks, sphinx-book-theme lays the pages out;
the stack of Jupyter Book 1, without its command line). Two editions are built:

    book/                 the English sources (conf.py, chapters in Markdown, _static/)
    book/ar/              the Arabic edition (right to left), its own conf.py and pages
    notebooks/*.ipynb     the chapters: read with their committed outputs, never executed
    figures/*.png         the figures the chapters show

Sphinx reads only files under its source folder, and the notebooks live beside book/, not in
it. So each edition is first *staged*: its sources, the notebooks, the figures and a few
generated pages are copied into book/_build/src/<edition>/, and Sphinx builds from there into
book/_build/html/<edition>/. Copies keep their modification times and generated pages are
rewritten only when their text changes, so a second build re-reads only what changed.

Generated at build time (never committed, so they cannot go stale):

* generated/headline_*.md: the headline numbers of the systems studied, from minimoe.sizing;
* generated/kernel_results.md: the committed benchmark tables, and the GPU results if any;
* code/*.md: one page per source file of minimoe/ and kernels/, so that the text links to
  the code it discusses inside the built site.

Everything the pages load is served from the site itself: MathJax 3 comes from the
sphinx-mathjax-offline package (copied into _static/mathjax), fonts are the reader's own
(no web fonts), search is Sphinx's own offline index, and myst-nb's widget scripts (loaded
from a CDN by default) are switched off. Warnings are errors (-W).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import functools
import http.server
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

EDITIONS = ("en", "ar")
REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"
BUILD = BOOK / "_build"
MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")


def mathjax_source() -> Path:
    """The MathJax 3 folder shipped by the sphinx-mathjax-offline package (the `book` extra)."""
    import importlib.util

    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise SystemExit("the book needs MathJax served from the site: "
                         'pip install -e ".[book]" (package sphinx-mathjax-offline)')
    folder = Path(spec.origin).parent / "static" / "mathjax"
    if not (folder / "tex-chtml.js").is_file():
        raise SystemExit(f"{folder}/tex-chtml.js is missing: reinstall sphinx-mathjax-offline")
    return folder


# ----------------------------------------------------------------------------------------------
# Staging: copy what changed, write what is generated
# ----------------------------------------------------------------------------------------------
def copy_if_changed(source: Path, target: Path) -> None:
    """Copy one file, keeping its time stamp, unless an identical copy is already there."""
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def write_if_changed(target: Path, text: str) -> None:
    """Write a generated page only when its text changes (so Sphinx need not re-read it)."""
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def sync_tree(source: Path, target: Path, skip: tuple[str, ...] = ()) -> set[Path]:
    """Copy the files of `source` into `target`; returns the target paths written."""
    written = set()
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or relative.parts[0] in skip or "__pycache__" in relative.parts:
            continue
        if ".ipynb_checkpoints" in relative.parts:
            continue
        copy_if_changed(path, target / relative)
        written.add(target / relative)
    return written


def remove_stale(root: Path, keep: set[Path]) -> None:
    """Delete staged files whose source is gone (a renamed chapter must not linger)."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and path not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def headline_table(language: str) -> str:
    """The systems this book studies, sized by minimoe.sizing from their presets."""
    from minimoe.config import ModelConfig
    from minimoe.sizing import count_params

    systems = [("DeepSeek-V3", "deepseek-v3"), ("Ling-mini-2.0", "ling-mini-2.0"),
               ("Ling-flash-2.0", "ling-flash-2.0"), ("LongCat-Flash", "longcat-flash")]
    if language == "ar":
        header = ("| النموذج | المعاملات الكلية | المعاملات النشطة لكل وحدة نصية | النسبة النشطة | "
                  "الخبراء الموجَّهون (المختار منهم k) | الخبراء المشتركون |")
    else:
        header = ("| model | total parameters | active per token | active share | "
                  "routed experts (k chosen) | shared experts |")
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for label, name in systems:
        cfg = ModelConfig.preset(name)
        counts = count_params(cfg, include_mtp=False)
        total = counts["total"]
        if "active_min" in counts:  # LongCat-Flash: zero-computation experts vary the compute
            active = f"{counts['active_min'] / 1e9:.1f}B-{counts['active_max'] / 1e9:.1f}B"
            share = f"{counts['active_min'] / total:.1%}-{counts['active_max'] / total:.1%}"
        else:
            active = f"{counts['active'] / 1e9:.2f}B"
            share = f"{counts['active'] / total:.1%}"
        experts = f"{cfg.n_routed_experts} ({cfg.num_experts_per_tok})"
        if getattr(cfg, "n_zero_experts", 0):
            experts += f" + {cfg.n_zero_experts} zero"
        lines.append(f"| {label} | {total / 1e9:.1f}B | {active} | {share} | {experts} | "
                     f"{cfg.n_shared_experts or 0} |")
    return "\n".join(lines) + "\n"


def kernel_results() -> str:
    """The committed benchmark tables; GPU tables and figures only where a run committed them."""
    results, figures = REPO / "notebooks" / "results", REPO / "figures"
    parts = []
    gpu_table = results / "kernels_bench.md"
    if gpu_table.is_file():
        parts.append("### GPU results\n\n" + gpu_table.read_text(encoding="utf-8"))
        for name in ("kernels_roofline.png", "kernels_speedup.png"):
            if (figures / name).is_file():
                parts.append(f"![{name}](../figures/{name})\n")
    else:
        parts.append("```{important}\nNo GPU results have been committed yet. Every number on "
                     "this page was measured on a 2-core CPU, and the Triton kernels were run "
                     "through Triton's interpreter, which checks that they are *correct* but "
                     "says nothing about their speed.\n```\n")
    for name in sorted(results.glob("*_cpu.md")):
        parts.append(f"### `notebooks/results/{name.name}`\n\n" + name.read_text(encoding="utf-8"))
    return "\n".join(parts)


def chapter_links() -> str:
    """For the Arabic edition: a link to every notebook chapter of the English edition,
    under the notebook's own title (its first heading), found by listing notebooks/."""
    lines = []
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        title = next((line.lstrip("#").strip() for cell in cells if cell["cell_type"] == "markdown"
                      for line in "".join(cell["source"]).splitlines() if line.startswith("# ")),
                     notebook.stem)
        title = title.replace("<", "&lt;")
        lines.append(f'* <a href="../en/notebooks/{notebook.stem}.html" dir="ltr">{title}</a>')
    return "\n".join(lines) + "\n"


def code_pages(target: Path) -> set[Path]:
    """One page per Python source file of the package, with the file shown in full."""
    written = set()
    sources = sorted((REPO / "minimoe").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py"))
    rows = []
    for source in sources:
        relative = source.relative_to(REPO)
        slug = "_".join(relative.with_suffix("").parts)
        page = target / "code" / f"{slug}.md"
        include = Path(os.path.relpath(source, page.parent)).as_posix()
        text = (f"# `{relative.as_posix()}`\n\n"
                f"```{{literalinclude}} {include}\n:language: python\n:linenos:\n"
                f":class: source-file\n```\n")
        write_if_changed(page, text)
        written.add(page)
        rows.append(f"* [`{relative.as_posix()}`]({slug}.md)")
    index = target / "code" / "index.md"
    write_if_changed(index, "# The source code\n\nEvery file of the package, as the book was "
                     "built. Lessons are the flat modules of `minimoe/`; `kernels/` is imported "
                     "as `minimoe.kernels`.\n\n```{toctree}\n:hidden:\n:glob:\n\n*\n```\n\n"
                     + "\n".join(rows) + "\n")
    written.add(index)
    return written


def routing_explorer_page(target: Path) -> Path:
    """The routing explorer as one self-contained page (``RoutingExplorer.to_html``), for the
    introduction's iframe: it recomputes the routing in the reader's browser, no kernel."""
    from minimoe.widgets.routing import DEFAULT_TEXT, RoutingExplorer
    from minimoe.widgets.routing_data import demo_model

    target.parent.mkdir(parents=True, exist_ok=True)
    RoutingExplorer(demo_model(), DEFAULT_TEXT).to_html(target, title="minimoe routing explorer")
    return target


def stage(edition: str, work: Path = BUILD) -> Path:
    """Assemble the source folder Sphinx builds one edition from (in WORK/src/EDITION)."""
    target = work / "src" / edition
    keep = set()
    if edition == "en":
        keep |= sync_tree(BOOK, target, skip=("ar", "_build"))
        for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
            copy_if_changed(notebook, target / "notebooks" / notebook.name)
            keep.add(target / "notebooks" / notebook.name)
        keep |= code_pages(target)
        keep.add(routing_explorer_page(target / "_static" / "routing_explorer.html"))
        generated = {"headline_en.md": headline_table("en"), "kernel_results.md": kernel_results()}
    else:
        keep |= sync_tree(BOOK / "ar", target)
        for shared in ("_static", "conf_common.py"):
            source = BOOK / shared
            if source.is_dir():
                keep |= sync_tree(source, target / shared)
            elif source.is_file():
                copy_if_changed(source, target / shared)
                keep.add(target / shared)
        generated = {"headline_ar.md": headline_table("ar"), "chapter_links.md": chapter_links()}
    keep |= sync_tree(REPO / "figures", target / "figures")
    for name, text in generated.items():
        write_if_changed(target / "generated" / name, text)
        keep.add(target / "generated" / name)
    remove_stale(target, keep)
    return target


def check_toc(edition: str) -> None:
    """Every notebook is a chapter: name the ones the English table of contents lacks.

    (Sphinx would also refuse them, as documents in no toctree, but less plainly.)
    """
    if edition != "en":
        return
    index = (BOOK / "index.md").read_text(encoding="utf-8")
    missing = [path.name for path in sorted((REPO / "notebooks").glob("*.ipynb"))
               if f"notebooks/{path.stem}" not in index]
    if missing:
        raise SystemExit(f"not in the book's table of contents: {', '.join(missing)}; add "
                         "each as notebooks/NAME to the toctree of book/index.md (and a line "
                         "to book/syllabus.md and book/ar/syllabus.md)")


def copy_mathjax(site: Path) -> None:
    """Serve MathJax from the site: the combined TeX->CHTML script, its fonts, its extensions."""
    source = mathjax_source()
    for part in MATHJAX_FILES:
        path = source / part
        if path.is_dir():
            sync_tree(path, site / "_static" / "mathjax" / part)
        else:
            copy_if_changed(path, site / "_static" / "mathjax" / part)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def build(editions=EDITIONS, out: Path | None = None, quiet: bool = True,
          work: Path = BUILD) -> dict[str, Path]:
    """Build the editions with warnings as errors; returns {edition: path of its index.html}.

    `work` holds the staged sources and Sphinx's cache (doctrees): a fresh folder gives a
    build from scratch, which re-emits every warning (a cached build re-reads only changes).
    """
    try:
        from sphinx.cmd.build import build_main
    except ImportError:
        raise SystemExit('the book needs Sphinx and myst-nb: pip install -e ".[book]"') from None
    work = Path(work)
    out = Path(out) if out is not None else work / "html"
    indexes = {}
    for edition in editions:
        if edition not in EDITIONS:
            raise SystemExit(f"--edition: unknown edition {edition!r}; choose from {EDITIONS}")
        check_toc(edition)
        source = stage(edition, work)
        site = out / edition
        # From scratch every time (about 10 s an edition): an incremental Sphinx build neither
        # re-emits the warnings of unchanged pages nor redraws their navigation.
        for stale in (site, work / "doctrees" / edition):
            if stale.exists():
                shutil.rmtree(stale)
        args = ["-b", "html", "-W", "--keep-going", "-d", str(work / "doctrees" / edition),
                str(source), str(site)]
        if edition == "en":  # book/_ext/code_links.py finds definitions in the source tree
            args[:0] = ["-D", f"code_links_root={REPO}"]
        if quiet:
            args.insert(0, "-q")
        status = build_main(args)
        if status != 0:
            raise SystemExit(f"the {edition} edition failed to build (Sphinx exit status "
                             f"{status}; warnings are errors): see the messages above")
        copy_mathjax(site)
        indexes[edition] = site / "index.html"
    return indexes


# ----------------------------------------------------------------------------------------------
# Looking at the book in a browser (tests and screenshots)
# ----------------------------------------------------------------------------------------------
def chromium_path() -> str | None:
    """The system's Chromium (Debian: apt-get install chromium); playwright's own download
    is not used, so nothing is fetched at run time."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@contextlib.contextmanager
def serve(root: Path):
    """Serve `root` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the URL.

    Fonts and scripts behave as on a real web server (file:// URLs restrict them)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no line per request
        pass


@contextlib.contextmanager
def offline_page(browser, base_url: str, blocked: list):
    """A browser page that may load only from `base_url`; every other request is aborted and
    its URL appended to `blocked` (so a test can say what tried to reach the network)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()

    def route(request_route):
        url = request_route.request.url
        if url.startswith(base_url) or url.startswith("data:") or url.startswith("blob:"):
            request_route.continue_()
        else:
            blocked.append(url)
            request_route.abort()

    page.route("**/*", route)
    try:
        yield page
    finally:
        context.close()


SCREENSHOT_PAGES = {"en": "en/notebooks/02_routing_and_balance.html", "ar": "ar/intro.html"}


def screenshots(site_root: Path, figures: Path = REPO / "figures") -> list[Path]:
    """Screenshots of one English and one Arabic page (figures/book_en.png, book_ar.png)."""
    executable = chromium_path()
    if executable is None:
        raise SystemExit("--screenshots needs Chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    written, blocked = [], []
    with serve(site_root) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        for edition, page_path in SCREENSHOT_PAGES.items():
            with offline_page(browser, url, blocked) as page:
                page.goto(f"{url}/{page_path}")
                page.wait_for_selector("mjx-container", timeout=30_000)
                target = figures / f"book_{edition}.png"
                page.screenshot(path=str(target))
                written.append(target)
        browser.close()
    if blocked:
        raise SystemExit(f"pages tried to load from the network: {sorted(set(blocked))}")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimoe.book", description=__doc__.split("\n")[0])
    parser.add_argument("--edition", action="append", choices=EDITIONS,
                        help="build only this edition (repeatable; default: both)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default book/_build/html); editions go in OUT/en, OUT/ar")
    parser.add_argument("--screenshots", action="store_true",
                        help="then write figures/book_en.png and book_ar.png (needs chromium)")
    parser.add_argument("--verbose", action="store_true", help="Sphinx's progress messages")
    args = parser.parse_args(argv)
    if args.screenshots and args.edition and set(args.edition) != set(EDITIONS):
        parser.error("--screenshots shows one page of each edition: build both (no --edition)")
    start = time.perf_counter()
    indexes = build(tuple(args.edition or EDITIONS), args.out, quiet=not args.verbose)
    for edition, index in indexes.items():
        print(f"{edition}: {index}")
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.screenshots:
        for path in screenshots(next(iter(indexes.values())).parents[1]):
            print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
