"""Sphinx extension: inline code naming minimoe code links to that code's page.

The chapters (notebooks included, which the book never edits) name the code they discuss as
inline code. After Sphinx resolves references, each such literal is wrapped in a link to the
page code/<slug> that minimoe.book generated for the file (slug: the file's path with "/" as
"_" and no ".py"; kernels/ is the package minimoe.kernels). Three forms are recognised:

* a path:          `minimoe/balance.py`, `kernels/fused_moe.py`
* a dotted name:   `minimoe.router`, `minimoe.kernels.moe_align`, `minimoe.sizing.count_params`
                   (the longest prefix that is a module wins)
* a function or class defined at the top level of exactly one source file, with the
  `minimoe.` prefix (`minimoe.load_pretrained`, `minimoe.Transformer`) or without it if the
  name has an underscore or an inner capital (`dispatch_sorted`, `RoutedExperts`; not `main`
  or `Router` alone). A name defined in two files is ambiguous and left alone. Linking by definition
  keeps a link right when a file is renamed or moved into a subpackage.

The definitions are read (with ast, nothing is imported) from the source tree given by the
`code_links_root` setting, which minimoe.book passes; without it only the first two forms
link. A literal that matches nothing, or is already inside a link, is left as it is.
"""

import ast
import re
from collections import defaultdict
from pathlib import Path

from docutils import nodes

DOTTED = re.compile(r"^minimoe(?:\.[A-Za-z_]\w*)+$")
PATH = re.compile(r"^((?:minimoe|kernels)(?:/\w+)+)\.py$")
IDENTIFIER = re.compile(r"^[A-Za-z]\w*$")


def definitions(root: Path) -> dict[str, str]:
    """{top-level function or class name: slug of the only file that defines it}."""
    where = defaultdict(set)
    files = sorted((root / "minimoe").rglob("*.py")) + sorted((root / "kernels").glob("*.py"))
    for path in files:
        slug = "_".join(path.relative_to(root).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                where[node.name].add(slug)
    return {name: slugs.pop() for name, slugs in where.items()
            if len(slugs) == 1 and not name.startswith("_")}


def candidate_slugs(text: str, defined: dict[str, str]) -> list[str]:
    """Code-page slugs the literal may name, most specific first."""
    path = PATH.match(text)
    if path:
        return [path.group(1).replace("/", "_")]
    if IDENTIFIER.match(text):  # a bare name must look like code: an underscore or inner capital
        distinctive = "_" in text or re.search(r"[a-z][A-Z]", text)
        return [defined[text]] if distinctive and text in defined else []
    if not DOTTED.match(text):
        return []
    parts = text.split(".")
    if parts[1] == "kernels":
        parts = parts[1:]  # minimoe.kernels.X lives in kernels/X.py
    slugs = []
    for n in range(len(parts), 0, -1):  # minimoe.sizing.count_params -> ..., minimoe_sizing
        slugs += ["_".join(parts[:n]), "_".join(parts[:n]) + "___init__"]
    if parts[-1] in defined:
        slugs.insert(0, defined[parts[-1]])
    return slugs


def read_definitions(app) -> None:
    root = app.config.code_links_root
    app.env.code_link_definitions = definitions(Path(root)) if root else {}


def link_code(app, doctree, docname) -> None:
    if docname.startswith("code/"):
        return
    found = app.env.found_docs
    defined = getattr(app.env, "code_link_definitions", {})
    for literal in list(doctree.findall(nodes.literal)):
        if isinstance(literal.parent, nodes.reference):
            continue
        for slug in candidate_slugs(literal.astext().strip(), defined):
            if f"code/{slug}" in found and slug != "minimoe___init__":
                uri = app.builder.get_relative_uri(docname, f"code/{slug}")
                reference = nodes.reference("", "", internal=True, refuri=uri,
                                            classes=["code-link"])
                reference += literal.deepcopy()
                literal.replace_self(reference)
                break


def setup(app):
    app.add_config_value("code_links_root", "", "env")
    app.connect("builder-inited", read_definitions)
    app.connect("doctree-resolved", link_code)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
