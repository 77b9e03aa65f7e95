"""RoutingExplorer: type a sentence, watch each token pick its experts, move the controls.

A thin view over minimoe.widgets.routing_data: the model runs once in Python (router logits
of every MoE layer, for the text and for a few documents per domain of the bundled corpus);
the front end (static/routing.js) recomputes scores, bias, groups, top-k, gate weights,
capacity and loads whenever a control moves. `.result` holds the same numbers computed in
Python with minimoe.router and minimoe.balance, updated on every change of a control, and
`to_html(path)` writes one self-contained page (module and data inlined) that keeps working
without Python, a kernel or a network.

    explorer = RoutingExplorer(model, "def add(a, b): return a + b")
    explorer                      # in JupyterLab: the explorer
    explorer.top_k = 4            # or move the slider; explorer.result follows
    explorer.to_html("routing.html")
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Sequence

import anywidget
import torch
import traitlets

from minimoe.widgets import routing_data

STATIC = pathlib.Path(__file__).parent / "static"
DEFAULT_TEXT = "The cat sat on the mat. def add(a, b): return a + b  12 + 7 = 19"
CONTROLS = ("layer", "top_k", "scoring_func", "temperature", "use_bias", "bias_scale",
            "n_group", "topk_group", "capacity_factor")


def byte_token_labels(ids: Sequence[int]) -> list[str]:
    """Display strings of byte tokens: a UTF-8 character on its first byte, '·' on the rest.

    Arabic letters take two bytes, so a byte-level model routes each half separately; the
    label shows the letter once and marks its continuation byte.
    """
    labels, data = [], bytes(ids)
    position = 0
    while position < len(data):
        lead = data[position]
        width = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else \
            4 if lead >> 3 == 0b11110 else 1
        char = data[position:position + width].decode("utf-8", errors="replace")
        char = {"\n": "⏎", "\t": "⇥"}.get(char, char)
        labels += [char] + ["·"] * (min(width, len(data) - position) - 1)
        position += width
    return labels


def token_labels(ids: Sequence[int], tokenizer) -> list[str]:
    """One display string per token id (byte tokenizers: see byte_token_labels)."""
    from minimoe.data import ByteTokenizer

    if tokenizer is None:
        return [f"#{i}" for i in ids]
    if isinstance(tokenizer, ByteTokenizer):
        return byte_token_labels(ids)
    return [tokenizer.decode([i]) for i in ids]


class RoutingExplorer(anywidget.AnyWidget):
    """Routing of one text through every MoE layer of `model`, with live controls.

    model: a minimoe.Transformer with MoE layers (the toy after `minimoe train`, a random
    model, or a load_pretrained layer subset). text (encoded by `tokenizer`) or token_ids.
    tokenizer: anything with encode/decode; default the byte tokenizer of minimoe.data when
    the vocabulary has 256 or more entries. domains: also route `tokens_per_domain` tokens
    of each domain of the bundled corpus (needs a tokenizer). layer: the layer shown first
    (default the last MoE layer).
    """

    _esm = STATIC / "routing.js"
    data = traitlets.Dict().tag(sync=True)
    layer = traitlets.Unicode().tag(sync=True)
    top_k = traitlets.Int(1).tag(sync=True)
    scoring_func = traitlets.Unicode("sigmoid").tag(sync=True)
    temperature = traitlets.Float(1.0).tag(sync=True)
    use_bias = traitlets.Bool(False).tag(sync=True)
    bias_scale = traitlets.Float(1.0).tag(sync=True)
    n_group = traitlets.Int(1).tag(sync=True)
    topk_group = traitlets.Int(1).tag(sync=True)
    capacity_factor = traitlets.Float(0.0).tag(sync=True)

    def __init__(self, model, text: Optional[str] = None, *, token_ids=None, tokenizer=None,
                 domains: bool = True, tokens_per_domain: int = 48, layer: Optional[str] = None,
                 max_tokens: int = 256) -> None:
        from minimoe.data import ByteTokenizer

        if tokenizer is None and model.cfg.vocab_size >= 256:
            tokenizer = ByteTokenizer()
        if token_ids is None:
            if tokenizer is None:
                raise ValueError(f"RoutingExplorer: the model's vocabulary has "
                                 f"{model.cfg.vocab_size} entries, too few for bytes; pass "
                                 "token_ids=... or a tokenizer=...")
            token_ids = tokenizer.encode(text if text is not None else DEFAULT_TEXT)
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)  # (1, T)
        if not 1 <= ids.shape[1] <= max_tokens:
            raise ValueError(f"RoutingExplorer: the text must have 1 to max_tokens={max_tokens} "
                             f"tokens, got {ids.shape[1]}")
        domain_ids = domain_names = None
        if domains and tokenizer is not None:
            domain_ids, domain_names = routing_data.domain_batch(tokenizer,
                                                                 tokens_per_domain=tokens_per_domain)
        payload = routing_data.build_payload(model, ids, token_labels(ids[0].tolist(), tokenizer),
                                             domain_ids, domain_names)
        if layer is not None and layer not in payload["layer_names"]:
            raise ValueError(f"RoutingExplorer: layer must be one of {payload['layer_names']}, "
                             f"got {layer!r}")
        settings = routing_data.default_settings(payload, layer)
        super().__init__(data=payload, **settings)
        self.result = routing_data.explore(payload, settings)
        self.observe(self._recompute, names=list(CONTROLS))

    @property
    def settings(self) -> dict:
        """The current value of every control."""
        return {name: getattr(self, name) for name in CONTROLS}

    def _recompute(self, change=None) -> None:
        self.result = routing_data.explore(self.data, self.settings)

    def to_html(self, path: str | os.PathLike, title: str = "minimoe routing explorer") -> str:
        """Write one self-contained HTML page of this explorer (no kernel, no network).

        The ES module and the data (logits, settings) are inlined; the page gives the module
        a small stand-in for the widget model. Written to a temporary file first, then moved,
        so an existing page is never left half-written. Returns the path.
        """
        state = {"data": self.data, **self.settings}
        page = HTML_TEMPLATE.format(
            title=title,
            module=_script_json(STATIC.joinpath("routing.js").read_text(encoding="utf-8")),
            state=_script_json(state),
        )
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        partial = path + ".partial"
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(partial, path)
        return path


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element ('</' cannot close it)."""
    return json.dumps(value).replace("</", "<\\/")


HTML_TEMPLATE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title></head>
<body>
<div id="explorer"></div>
<script type="module">
const source = {module};
const state = {state};
const listeners = {{}};
const model = {{
  get: (key) => state[key],
  set: (key, value) => {{
    if (state[key] === value) return;
    state[key] = value;
    for (const callback of listeners["change:" + key] || []) callback();
  }},
  on: (event, callback) => {{ (listeners[event] = listeners[event] || []).push(callback); }},
  off: () => {{}},
  save_changes: () => {{}},
}};
const url = URL.createObjectURL(new Blob([source], {{ type: "text/javascript" }}));
const module = await import(url);
module.default.render({{ model, el: document.getElementById("explorer") }});
document.body.dataset.ready = "true";
</script>
</body>
</html>
"""
