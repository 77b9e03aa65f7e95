"""Reading the project's prose for code names, and checking each against the source tree.

tests/test_prose_names.py runs this over README.md, every docstring and comment in minimoe/
(subpackages included, whatever they are called) and kernels/, and every markdown cell of
notebooks/*.ipynb. It is static: the package is parsed with `ast`, nothing is imported and
no model is built (about two seconds for everything).

What is checked, and how (a quoted span is inline code, `x` or ``x``; it may wrap a line,
never a blank one; fenced code blocks are not spans, but their `minimoe.*` names and the flags
of their `minimoe` commands are checked):

1. minimoe paths. Every `minimoe.a.b.c` in the prose, quoted or not, must resolve: the longest
   prefix naming a module of the tree (kernels/ is `minimoe.kernels`), then attributes: a
   module's top-level definitions and imports (followed to their target), a class's methods,
   class-level fields, `self.x` attributes and buffers, and those of its base classes. A call
   `minimoe.f(a=..., b=...)` also checks its keyword names against f's parameters (for a
   class: its dataclass fields and `__init__` parameters), unless f takes **kwargs.
2. Commands. In a span or fenced line that runs minimoe (`minimoe train ...`, `python -m
   minimoe...`), or a span that starts with `--`, every `--flag` and the subcommand after
   `minimoe` must be string literals of the package (argparse takes them as literals), and
   `--set FIELD=...` needs a ModelConfig field.
3. Paths. A path whose first component is a top-level folder of the project (minimoe/,
   kernels/, tests/, notebooks/, figures/, book/) or exists beside the quoting file must
   exist (`*` and `{a,b}` expand), unless its file name is a string literal of the package
   (an output the package writes, such as a GPU benchmark's figure). A bare `name.py` must be
   a file of minimoe/, kernels/ or tests/; `pyproject.toml`-like names must exist at the top
   or beside the quoting file; markdown links and images must point at existing files. Other
   paths (DeepSeek's `inference/model.py`, a checkpoint's `config.json`) are not ours.
4. Notebooks. "notebook 09", "notebooks 07 and 09" and `09_scale_out` need a
   notebooks/09_*.ipynb; "notebook 03, sections 5-7" also needs headings "## 5." to "## 7."
   there; in a notebook's markdown, a bare "section 5" needs its own "## 5." heading.
5. Names. `Head.attr...` whose head is a package class or module (`KVCache.append`,
   `sizing.count_params`) must resolve as in 1, unless the package itself writes string names
   starting with that head (`attention.query_key_value` is a checkpoint tensor name).
   `cfg.x`, `model.x`, `mla.x`, ... (INSTANCE_NAMES) need x to be a member of that class, or
   every component to be a known name (a tensor name such as `model.layers.{i}.mlp`). Any
   other identifier, call, subscript (`gate_proj[e]`), `name=value`, `name = value` (when the
   value is Python, not a formula), `config_key: value`, hyphenated name (`toy-classic`) or dotted
   name must be known: defined, imported or used anywhere in the package (modules,
   functions, classes, members, parameters, variables), a Triton pointer argument without its
   `_ptr`, or a word of a string literal of the package (Hugging Face tensor names and config
   keys live in mapping tables). Docstrings are not string literals here, so prose cannot
   vouch for itself. A CamelCase name must be a class of ours. A quoted string (`"absorbed"`,
   the value of `kernels="triton"`) must be a string literal or a module attribute name.
   In a notebook, the names and strings of its own code cells count as known too.
   Not checked: one-letter names (formula symbols), Python keywords, builtins and standard
   library modules, and FOREIGN names and prefixes (torch, triton, transformers, DeepSeek's
   code), each with its reason. Spans of other shapes (formulas, tensor shapes, shell
   commands with arguments) are not checked.
"""


from __future__ import annotations

import ast
import builtins
import functools
import glob
import io
import json
import keyword
import re
import sys
import tokenize
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_FOLDERS = ("minimoe", "kernels", "tests", "notebooks", "figures", "book")

# Names the prose quotes that belong to other projects. Each one says whose it is.
FOREIGN_PREFIXES = {
    "torch", "F", "nn",            # PyTorch (torch.nn.functional as F, torch.nn as nn)
    "tl", "triton",                # Triton (triton.language as tl)
    "transformers",                # the Hugging Face implementations we compare with
    "np", "numpy",                 # numpy (the standard library's modules are never ours)
    "huggingface_hub", "bitsandbytes", "safetensors",  # libraries named for comparison
    "pytest",                      # the test runner (the classroom's markers and plugin)
}
FOREIGN = {
    # transformers classes and helpers, named as the reference we match
    "DeepseekV2", "DeepseekV3", "DeepseekV3Attention", "DeepseekV3MoE", "LongcatFlash",
    "LongcatFlashMLA", "_compute_yarn_parameters",
    # DeepSeek's inference/model.py argument that selects its absorbed MLA
    "attn_impl",
    # triton.testing's benchmark helper (the kernel benchmarks' reference timer)
    "do_bench_cudagraph",
    # the GPU math function (tl.log2, torch.log2) a kernel docstring contrasts with bit operations
    "log2",
    # the Hugging Face CLI's download flag (`hf download ... --local-dir DIR`)
    "--local-dir",
    # torchtitan's and Megatron-LM's expert-parallel dispatchers, cited as the reference designs
    "ExpertParallel", "MoEAlltoAllTokenDispatcher", "input_splits", "sort_chunks_by_idxs",
}
# Instance names the prose uses for objects of a package class: `cfg.capacity_factor`.
INSTANCE_NAMES = {
    "cfg": ("ModelConfig",),
    "config": ("ModelConfig",),
    "model": ("Transformer",),
    "mla": ("MultiHeadLatentAttention",),
    "cache": ("KVCache",),
    "out": ("ModelOutput",),
    "layer": ("DecoderLayer", "ShortcutDecoderLayer", "MoE"),
    "store": ("ExpertStore",),
}
NOT_NAMES = set(keyword.kwlist) | set(dir(builtins)) | set(sys.stdlib_module_names) | {"self", "cls"}

IDENT = r"[A-Za-z_]\w*"
MINIMOE_PATH = re.compile(r"(?<![\w./-])minimoe(?:\.[A-Za-z_]\w*)+(?:\([^()`]*\))?")
NOTEBOOK_REF = re.compile(
    r"\bnotebooks?\s+(\d{1,2}(?:(?:\s*,\s*|\s+and\s+|\s+or\s+|\s*[-–]\s*)\d{1,2}(?!\.\d))*)"
    r"(?:,?\s+sections?\s+(\d+)(?:\s*(?:[-–]|and|to)\s*(\d+))?)?",
    re.IGNORECASE,
)
NOTEBOOK_ID = re.compile(r"(?<![\w/])(?:notebooks/)?(\d{2}_[a-z][a-z0-9_]*)(?:\.ipynb)?\b")
OWN_SECTION_REF = re.compile(r"\b[Ss]ections?\s+(\d+)(?:\s*(?:[-–]|and|to)\s*(\d+))?")
RUNS_MINIMOE = re.compile(r"(?:^|\s|/)minimoe\s|python3? -m minimoe")
SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


# ----------------------------------------------------------------------------------------------
# What the package defines, read from its source with ast
# ----------------------------------------------------------------------------------------------
@dataclass
class ClassInfo:
    module: str
    members: set = field(default_factory=set)
    bases: list = field(default_factory=list)   # base expressions, as dotted strings
    params: set = field(default_factory=set)    # __init__ parameters and dataclass fields
    open_kwargs: bool = False                   # __init__ takes **kwargs


@dataclass
class ModuleInfo:
    top: dict = field(default_factory=dict)  # name -> ("def"|"class"|"var", None) or ("import", target)


@dataclass
class PackageIndex:
    modules: dict = field(default_factory=dict)   # "minimoe.moe" -> ModuleInfo
    classes: dict = field(default_factory=dict)   # "minimoe.moe.MoE" -> ClassInfo
    known_words: set = field(default_factory=set)  # every defined/imported name, parameter, member
    literals: set = field(default_factory=set)     # every string literal (docstrings excluded)
    literal_words: set = field(default_factory=set)
    callables: dict = field(default_factory=dict)  # bare name -> list of (params, open_kwargs)


def _module_files(root):
    """(dotted module name, file) for every module of minimoe/ (any depth) and kernels/."""
    for path in sorted((root / "minimoe").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path
    for path in sorted((root / "kernels").glob("*.py")):
        stem = path.stem
        yield "minimoe.kernels" + ("" if stem == "__init__" else "." + stem), path


def _docstring_nodes(tree):
    """The Constant nodes that are docstrings or bare string statements (prose, not data)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                        and isinstance(stmt.value.value, str):
                    yield stmt.value


def _dotted(expr):
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        inner = _dotted(expr.value)
        return inner and inner + "." + expr.attr
    return None


def _signature(fn):
    args = fn.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    names |= {a.arg for a in (args.vararg, args.kwarg) if a}
    return names, args.kwarg is not None


def _read_class(module, node, index):
    info = ClassInfo(module=module, bases=[b for b in map(_dotted, node.bases) if b])
    is_dataclass = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
    for stmt in node.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            info.members.add(stmt.name)
        elif isinstance(stmt, ast.Assign):
            info.members |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            info.members.add(stmt.target.id)
            if is_dataclass:
                info.params.add(stmt.target.id)
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
            names, open_kwargs = _signature(stmt)
            info.params |= names - {"self"}
            info.open_kwargs = open_kwargs
    for sub in ast.walk(node):  # self.x = ..., register_buffer("x", ...)
        targets = []
        if isinstance(sub, ast.Assign):
            targets = sub.targets
        elif isinstance(sub, (ast.AnnAssign, ast.AugAssign)):
            targets = [sub.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    info.members.add(t.attr)
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) \
                and sub.func.attr in ("register_buffer", "register_parameter") and sub.args \
                and isinstance(sub.args[0], ast.Constant):
            info.members.add(sub.args[0].value)
    index.classes[f"{module}.{node.name}"] = info
    index.known_words |= info.members | info.params


def _import_target(module, is_package, node, alias):
    if isinstance(node, ast.Import):
        return alias.name
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return f"{base}.{alias.name}"


@functools.cache
def _parse(path):
    return ast.parse(path.read_text(encoding="utf-8"))


def _read_module(module, path, index):
    tree = _parse(path)
    info = ModuleInfo()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            info.top[node.name] = ("def", None)
        elif isinstance(node, ast.ClassDef):
            info.top[node.name] = ("class", None)
            _read_class(module, node, index)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        info.top[t.id] = ("var", None)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                plain = isinstance(node, ast.Import) and not alias.asname  # import a.b binds a
                target = alias.name.split(".")[0] if plain else \
                    _import_target(module, path.name == "__init__.py", node, alias)
                info.top[bound] = ("import", target)
    docstrings = {id(n) for n in _docstring_nodes(tree)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names, open_kwargs = _signature(node)
            index.known_words |= names | {node.name}
            index.callables.setdefault(node.name, []).append((names, open_kwargs))
        elif isinstance(node, ast.ClassDef):
            index.known_words.add(node.name)
        elif isinstance(node, ast.Name):
            index.known_words.add(node.id)
        elif isinstance(node, ast.Attribute):
            index.known_words.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            index.known_words.add(node.arg)
        elif isinstance(node, ast.alias):
            index.known_words |= {node.asname or "", *node.name.split(".")}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            index.literals.add(node.value)
            index.literal_words |= set(re.findall(r"--?[\w-]+|[\w.-]+", node.value))
            index.literal_words |= set(re.findall(r"\w+", node.value))
    index.modules[module] = info
    index.known_words |= set(info.top) | set(module.split("."))


@functools.cache
def package_index(root: Path = ROOT) -> PackageIndex:
    """Everything the package under `root` defines, imports and writes in string literals."""
    index = PackageIndex()
    for module, path in _module_files(root):
        _read_module(module, path, index)
    for qualname, cls in index.classes.items():
        index.callables.setdefault(qualname.rsplit(".", 1)[1], []).append((cls.params, cls.open_kwargs))
    return index


# ----------------------------------------------------------------------------------------------
# Resolving a dotted name in the package
# ----------------------------------------------------------------------------------------------
def _class_member(index, qualname, member, seen=()):
    """The kind of `member` on the class (searching its bases), or None."""
    cls = index.classes.get(qualname)
    if cls is None or qualname in seen:
        return None
    if member in cls.members:
        nested = f"{qualname}.{member}"
        return ("class", nested) if nested in index.classes else ("member", qualname)
    for base in cls.bases:
        resolved = _resolve_in_module(index, cls.module, base.split("."))
        if resolved and resolved[0] == "class":
            found = _class_member(index, resolved[1], member, seen + (qualname,))
            if found:
                return found
    return None


def _resolve_in_module(index, module, parts, depth=0):
    """Follow `parts` from `module`: (kind, where) or None.

    kind is "module", "class", "def", "var", "member" (of the class `where`) or "foreign".
    """
    if depth > 20:
        return None
    where = ("module", module)
    for part in parts:
        kind, name = where
        if kind == "module":
            if f"{name}.{part}" in index.modules:
                where = ("module", f"{name}.{part}")
                continue
            binding = index.modules[name].top.get(part)
            if binding is None:
                return None
            if binding[0] == "import":
                where = resolve_dotted(index, binding[1], depth + 1)
                if where is None:
                    return None
            elif binding[0] == "class":
                where = ("class", f"{name}.{part}")
            else:
                where = (binding[0], f"{name}.{part}")
        elif kind == "class":
            found = _class_member(index, name, part)
            if found is None:
                return None
            where = found
        elif kind == "foreign":
            return where
        else:  # a function, a variable or an instance attribute: nothing to look inside
            return None
    return where


def resolve_dotted(index, dotted, depth=0):
    parts = dotted.split(".")
    if parts[0] != "minimoe":
        return ("foreign", dotted)
    return _resolve_in_module(index, "minimoe", parts[1:], depth)


def _call_keywords(call_args):
    """The keyword names of a call's argument list, at its top level only."""
    depth, top = 0, []
    for char in call_args or "":
        depth += char in "([{"
        depth -= char in ")]}"
        top.append(char if depth == 0 else " ")
    return re.findall(r"(?:^|,)\s*(" + IDENT + r")\s*=(?!=)", "".join(top))


def _signature_of(index, where, short_name):
    """(parameter names, takes **kwargs) of the resolved callable, or None when unknown."""
    kind, name = where
    if kind == "class":
        cls = index.classes[name]
        return cls.params, cls.open_kwargs or not (cls.params or cls.bases == [])
    if kind in ("def", "member"):
        candidates = index.callables.get(short_name, [])
        if candidates:
            params = set().union(*(c[0] for c in candidates))
            return params, any(c[1] for c in candidates)
    return None


def check_call_keywords(index, where, short_name, call_args):
    signature = _signature_of(index, where, short_name) if where else None
    if signature is None or signature[1]:
        return []
    return [f"`{short_name}` has no parameter `{kw}`" for kw in _call_keywords(call_args)
            if kw not in signature[0]]


def check_minimoe_path(index, text):
    """Rule 1: a `minimoe.a.b(...)` path resolves, and its keywords are parameters."""
    match = re.fullmatch(r"(minimoe(?:\.\w+)+)(?:\((.*)\))?", text, re.DOTALL)
    dotted, call_args = match.group(1), match.group(2)
    where = resolve_dotted(index, dotted)
    if where is None:
        return [f"`{dotted}` does not resolve in the package"]
    return check_call_keywords(index, where, dotted.rsplit(".", 1)[1], call_args)


# ----------------------------------------------------------------------------------------------
# The rules for one quoted span
# ----------------------------------------------------------------------------------------------
def _word_known(index, word):
    word = word.strip()
    return (not word or word in index.known_words or word in index.literal_words
            or word + "_ptr" in index.known_words  # a Triton pointer argument, by its tensor's name
            or word in NOT_NAMES or word in FOREIGN or len(word) == 1
            or re.fullmatch(r"\d+|\{[^{}]*\}|\*|\[[^\]]*\]", word) is not None)


def _short_modules(index):
    short = {}
    for module in index.modules:
        short.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    return short


def _classes_named(index, name):
    return [q for q in index.classes if q.rsplit(".", 1)[1] == name]


def check_dotted(index, dotted, call_args=None):
    """Rule 5 for `head.a.b` that does not start with minimoe."""
    parts = dotted.split(".")
    head = parts[0]
    if head in FOREIGN_PREFIXES or head in FOREIGN or head in NOT_NAMES or len(head) == 1:
        return []
    attempts = []  # resolutions tried: (where-after-head, rest)
    for module in _short_modules(index).get(head, []):
        attempts.append((("module", module), parts[1:]))
    for qualname in _classes_named(index, head):
        attempts.append((("class", qualname), parts[1:]))
    # A package class or module as head: the path must resolve, unless the package itself
    # writes names that start that way (`attention.query_key_value`, a checkpoint tensor name).
    strict = bool(attempts) and not any(lit.startswith(head + ".") or f".{head}." in lit
                                        for lit in index.literals)
    for class_name in INSTANCE_NAMES.get(head, ()):
        for qualname in _classes_named(index, class_name):
            attempts.append((("class", qualname), parts[1:2]))  # an instance: its attribute
    for start, rest in attempts:
        where = start
        for part in rest:
            where = _resolve_in_module(index, where[1], [part]) if where[0] == "module" \
                else _class_member(index, where[1], part) if where[0] == "class" else None
            if where is None:
                break
        if where is not None:
            return check_call_keywords(index, where, parts[-1], call_args)
    if strict and head not in INSTANCE_NAMES:
        return [f"`{dotted}` does not resolve in the package"]
    unknown = [p for p in parts if not _word_known(index, p)]
    if head in INSTANCE_NAMES or re.fullmatch(r"[a-z_]\w*", head):
        if unknown:
            return [f"`{dotted}`: the package knows no name `{'`, `'.join(unknown)}`"]
        return []
    if head[0].isupper():
        return [f"`{dotted}`: `{head}` is no class or module of the package"]
    return []


def check_identifier(index, name, call_args=None):
    if len(name) == 1 or name in NOT_NAMES or name in FOREIGN:
        return []
    if call_args is not None:
        if name not in index.callables and name not in index.known_words:
            return [f"`{name}(...)` is not defined in the package"]
        candidates = [("def", name)] if name in index.callables else []
        for qualname in _classes_named(index, name):
            candidates.insert(0, ("class", qualname))
        return check_call_keywords(index, candidates[0], name, call_args) if candidates else []
    if name[0].isupper() and any(c.islower() for c in name):  # CamelCase: a class
        if not _classes_named(index, name) and name not in index.known_words:
            return [f"`{name}` is no class of the package"]
        return []
    if not _word_known(index, name):
        return [f"`{name}` is not a name the package defines or uses"]
    return []


def check_flag(index, flag):
    if flag in FOREIGN or flag in index.literals or flag.split("=")[0] in index.literals:
        return []
    return [f"`{flag}` is no command-line flag of the package"]


def check_command(index, command):
    """Rule 2: the subcommand, flags and `--set FIELD=` of a command line that runs minimoe."""
    command = command.split(" #")[0]
    problems = [p for flag in re.findall(r"(?<!\S)--[\w-]+", command) for p in check_flag(index, flag)]
    for key in re.findall(r"--set\s+(\w+)=", command):  # minimoe train --set FIELD=VALUE
        if not _class_member(index, "minimoe.config.ModelConfig", key):
            problems.append(f"`--set {key}=...`: ModelConfig has no field `{key}`")
    subcommand = re.search(r"(?:^|\s|/)minimoe\s+([a-z][\w-]*)", command)
    if subcommand and subcommand.group(1) not in index.literals:
        problems.append(f"`minimoe {subcommand.group(1)}` is no command of the package")
    return problems


def _repo_glob(pattern):
    expanded = [pattern]
    while any("{" in p for p in expanded):
        p = next(p for p in expanded if "{" in p)
        m = re.search(r"\{([^{}]*)\}", p)
        expanded.remove(p)
        expanded += [p[: m.start()] + choice + p[m.end():] for choice in m.group(1).split(",")]
    return [hit for p in expanded for hit in glob.glob(str(p))]


def check_path(path, base):
    """Rule 3 (None: not a path of ours)."""
    path = path.rstrip(".,;:")
    if re.fullmatch(r"[\w-]+\.py", path):
        found = any(next((ROOT / d).rglob(path), None) for d in ("minimoe", "kernels", "tests"))
        return [] if found else [f"`{path}` is no file of minimoe/, kernels/ or tests/"]
    if "/" not in path:  # pyproject.toml, README.md, 01_moe_layer.ipynb: beside us or at the top
        return [] if (ROOT / path).exists() or (base / path).exists() else [f"`{path}` does not exist"]
    first = path.split("/")[0]
    candidates = []
    if first in TOP_LEVEL_FOLDERS:
        candidates.append(ROOT / path)
    elif (base / first).exists():
        candidates.append(base / path)
    else:
        return None
    if any(_repo_glob(str(c)) for c in candidates):
        return []
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if any(n in package_index().literals for n in (name, name.split(".")[0])):
        return []  # an output the package writes (`figures/kernels_roofline.png` after a GPU run)
    return [f"`{path}` does not exist"]


def check_notebook(number, sections=None):
    hits = sorted((ROOT / "notebooks").glob(f"{int(number):02d}_*.ipynb"))
    if not hits:
        return [f"notebook {number} does not exist (no notebooks/{int(number):02d}_*.ipynb)"]
    return check_sections(hits[0], sections)


def check_sections(notebook, sections):
    if not sections:
        return []
    first, last = int(sections[0]), int(sections[1] or sections[0])
    headings = set()
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            text = "".join(cell["source"])
            headings |= {int(n) for n in re.findall(r"^#+\s*(\d+)\.", text, re.MULTILINE)}
    missing = [n for n in range(first, last + 1) if n not in headings]
    return [f"{notebook.name} has no section {n}" for n in missing]


def _is_expression(text):
    """`E = 64`, `kernels = "reference" | "triton"` are Python; `dW_e = dH_e^T X_e` is a formula."""
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return True


def _string_known(index, value):
    """A quoted value the package uses: a string literal, or a module attribute named by string."""
    return value in index.literals or any(value in c.members for c in index.classes.values())


def check_span(index, span, base):
    """All rules for one inline-code span; the list of problems."""
    s = " ".join(re.sub(r"\.\n\s*", ".", span).split())  # a name wrapped after a dot is one name
    problems = []
    for m in MINIMOE_PATH.finditer(s):
        problems += check_minimoe_path(index, m.group(0))
    runs_minimoe = RUNS_MINIMOE.search(s) or s.startswith("--")
    if runs_minimoe:
        problems += check_command(index, s)
    if MINIMOE_PATH.fullmatch(s) or runs_minimoe or s.startswith("minimoe."):
        return problems
    s = re.sub(r"^@|\.$|=$", "", s)             # `@decorator`, `model.mtp.` (a prefix), `layers=`
    s = re.sub(r"^(\S+?)\[[^\]]*\]$", r"\1", s)  # `gate_proj[e]`, `out.aux["router"]`: the name
    hyphenated = re.fullmatch(r"[a-z0-9][\w.]*(-[\w.]+)+", s) and not re.search(r"\.[a-z]{2,}$", s)
    if hyphenated:  # `toy-classic`, `ling-mini-2.0`: names the package writes in strings
        return problems + ([] if s in index.literal_words else [f"`{s}` is no name the package uses"])
    if re.fullmatch(rf"{IDENT}=[^,]+(,\s*{IDENT}=[^,]+)+", s):  # `a=1, b=N`: keyword names
        return problems + [p for kw in _call_keywords(s) for p in check_identifier(index, kw)]
    m = NOTEBOOK_ID.fullmatch(s)
    if m:
        return problems + check_notebook(m.group(1)[:2]) + (
            [] if (ROOT / "notebooks" / f"{m.group(1)}.ipynb").exists() else [f"`{s}` is no notebook"])
    if re.fullmatch(r"[\w.{},*-]+(/[\w.{},*-]*)+|[\w-]+\.(py|ipynb|toml|md|cfg)", s):
        found = check_path(s, base)
        return problems + (found or [])
    if re.fullmatch(r'"[\w./ -]+"', s):
        known = _string_known(index, s[1:-1])
        return problems + ([] if known else [f"`{s}` is no string literal of the package"])
    m = re.fullmatch(rf"({IDENT}(?:\.[\w{{}}*+ ]+)*)\s*(\((.*)\))?", s)
    if m and " " not in m.group(1).replace("{num_hidden_layers + k}", ""):
        name, call_args = m.group(1), m.group(3) if m.group(2) else None
        if "." in name:
            return problems + check_dotted(index, name, call_args)
        return problems + check_identifier(index, name, call_args)
    m = re.fullmatch(rf"({IDENT}(?:\.{IDENT})*)\s*(=|:)\s*(.+)", s)
    config_key = m and m.group(2) == ":" and re.fullmatch(r"[a-z_][a-z0-9_]*", m.group(1)) \
        and " " not in m.group(3) and m.group(3) != "..."  # `rope_interleave: true`, not `User: ...`
    if m and (config_key or (m.group(2) == "=" and _is_expression(m.group(3)))):
        name, value = m.group(1), m.group(3)
        if "." in name:
            problems += check_dotted(index, name)
        else:
            problems += check_identifier(index, name)
        quoted = re.fullmatch(r'"([\w.-]+)"', value)
        if quoted and name not in FOREIGN and not _string_known(index, quoted.group(1)):
            problems.append(f"`{s}`: \"{quoted.group(1)}\" is no string literal of the package")
        return problems
    return problems


# ----------------------------------------------------------------------------------------------
# The prose: where it is, and its line numbers
# ----------------------------------------------------------------------------------------------
@dataclass
class Prose:
    label: str        # how a failure names the place, without the line
    text: str
    first_line: int   # line number of text's first line in the file (1-based)
    base: Path        # folder that relative paths start from
    notebook: Path | None = None


def prose_of(path: Path):
    rel = path.relative_to(ROOT).as_posix()
    if path.suffix == ".md":
        yield Prose(rel, path.read_text(encoding="utf-8"), 1, path.parent)
    elif path.suffix == ".ipynb":
        for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "markdown":
                yield Prose(f"{rel} cell {i}", "".join(cell["source"]), 1, path.parent, path)
    else:
        source = path.read_text(encoding="utf-8")
        for node in _docstring_nodes(_parse(path)):
            yield Prose(rel, node.value, node.lineno, path.parent)
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                yield Prose(rel, token.string, token.start[0], path.parent)


@functools.cache
def notebook_index(notebook: Path) -> PackageIndex:
    """The package's names plus the names and strings a notebook's own code cells define.

    A notebook's markdown talks about its variables (`router_norm`, `skew_logits`) and the
    environment variables its cells read; those count as defined, for that notebook only.
    """
    index, words, literals = package_index(), set(), set()
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines(True)
        source = "".join(line for line in lines if not line.lstrip().startswith(("%", "!")))  # magics
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name):
                words.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                words.add(node.name)
            elif isinstance(node, ast.arg):
                words.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
                words |= set(re.findall(r"\w+", node.value))
    return replace(index, known_words=index.known_words | words, literals=index.literals | literals)


def problems_in(prose: Prose, index=None):
    """[(where, problem)] for one piece of prose."""
    index = index or (notebook_index(prose.notebook) if prose.notebook else package_index())
    text, found = prose.text, []

    def where(offset):
        line = prose.first_line + text.count("\n", 0, offset)
        return f"{prose.label} line {line}" if prose.notebook else f"{prose.label}:{line}"

    fenced = [(m.start(), m.end()) for m in FENCE.finditer(text)]
    in_fence = lambda pos: any(a <= pos < b for a, b in fenced)  # noqa: E731
    for start, end in fenced:  # commands: minimoe paths and the flags of minimoe commands
        for offset, line in _lines_with_offsets(text, start, end):
            if RUNS_MINIMOE.search(line):
                found += [(where(offset), p) for p in check_command(index, line)]
            for m in MINIMOE_PATH.finditer(line.split("#")[0]):
                found += [(where(offset + m.start()), p) for p in check_minimoe_path(index, m.group(0))]
    spans = [m for m in SPAN.finditer(text) if not in_fence(m.start())]
    covered = [(m.start(), m.end()) for m in spans]
    for m in spans:
        found += [(where(m.start()), p) for p in check_span(index, m.group(2), prose.base)]
    for m in MINIMOE_PATH.finditer(text):  # unquoted minimoe paths in the prose
        if not in_fence(m.start()) and not any(a <= m.start() < b for a, b in covered):
            found += [(where(m.start()), p) for p in check_minimoe_path(index, m.group(0))]
    for m in re.finditer(r"\]\((?!https?:|#)([^)\s]+)\)", text):  # markdown links and images
        if not (prose.base / m.group(1)).exists() and not (ROOT / m.group(1)).exists():
            found.append((where(m.start()), f"link target `{m.group(1)}` does not exist"))
    for m in NOTEBOOK_REF.finditer(text):
        numbers = re.findall(r"\d+", m.group(1))
        if re.search(r"[-–]", m.group(1)) and len(numbers) == 2:
            numbers = [f"{n:02d}" for n in range(int(numbers[0]), int(numbers[1]) + 1)]
        sections = (m.group(2), m.group(3)) if m.group(2) else None
        for number in numbers:
            one_notebook_sections = sections if len(numbers) == 1 else None
            found += [(where(m.start()), p) for p in check_notebook(number, one_notebook_sections)]
    for m in NOTEBOOK_ID.finditer(text):
        missing = not (ROOT / "notebooks" / f"{m.group(1)}.ipynb").exists()
        if missing and m.group(0).startswith("notebooks/"):
            found.append((where(m.start()), f"`{m.group(0)}` is no notebook"))
    if prose.notebook is not None:
        for m in OWN_SECTION_REF.finditer(text):
            if not re.search(r"notebooks?\s+\d+,?\s*$|§\s*$", text[max(0, m.start() - 20): m.start()]):
                found += [(where(m.start()), p) for p in check_sections(prose.notebook, m.groups())]
    return found


def _lines_with_offsets(text, start, end):
    offset = start
    for line in text[start:end].split("\n"):
        yield offset, line
        offset += len(line) + 1


def prose_files():
    files = [ROOT / "README.md"]
    files += sorted((ROOT / "minimoe").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    return files
