"""Text <-> token ids for published checkpoints: tokenizer.json and the chat template.

The idea
--------
A model reads token ids, never text. A hub checkpoint ships its tokenizer as two files:

* ``tokenizer.json`` -- the whole tokenizer (normaliser, pre-tokeniser, the BPE merges or
  vocabulary, the special tokens, the post-processor that adds a BOS token) in the format of
  the ``tokenizers`` library, which runs it (Rust, fast).
* ``tokenizer_config.json`` -- the special tokens by name (``bos_token``, ``eos_token``),
  whether encoding adds BOS, and the *chat template*: a Jinja2 program that turns a list of
  messages ``[{"role": "user", "content": "..."}, ...]`` into the exact text the model was
  fine-tuned on, role markers and all (DeepSeek-V3: ``<｜User｜>...<｜Assistant｜>``). Newer
  checkpoints keep the template in ``chat_template.jinja`` instead.

A chat model answers well only when its prompt looks like its fine-tuning data, so the
template matters as much as the weights. Rendering it needs the variables templates use:
``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt`` (end the text with the
assistant's role marker so the model's next tokens are its answer), and the helper
``raise_exception``. The rendered text already contains BOS, so it is encoded without adding
special tokens again.

What the reader should notice
-----------------------------
* Special tokens (``<｜end▁of▁sentence｜>``) are single ids, never split by BPE; generation
  stops when the model emits the EOS id.
* The template runs in Jinja2's sandbox: it comes with a downloaded checkpoint, and a
  sandbox keeps it from reaching Python objects it was not given.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional

from minimoe.checkpoints.shards import read_json


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json spells a special token as a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """tokenizer.json (run by ``tokenizers``) + tokenizer_config.json's special tokens and
    chat template. Build with ``load_tokenizer(folder)``."""

    def __init__(self, backend, config: dict, chat_template: Optional[str], folder: str) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.config = config
        self.chat_template = chat_template
        self.folder = folder
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; add_special_tokens runs tokenizer.json's post-processor (BOS), and
        prepends bos_token when tokenizer_config.json says add_bos_token but the
        post-processor does not."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.config.get("add_bos_token") and self.bos_token_id
                is not None and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **variables) -> str:
        """The chat template applied to ``messages``: the text the model should continue."""
        if not self.chat_template:
            raise ValueError(f"tokenizer in {self.folder} has no chat template (neither "
                             "tokenizer_config.json's 'chat_template' nor chat_template.jinja); "
                             "use plain prompts (minimoe generate) with this checkpoint")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', "
                                 f"got {message!r}")
        template = _jinja_environment().from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                               **variables)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables) -> list[int]:
        """render_chat, encoded (the template writes BOS itself: no special tokens added)."""
        text = self.render_chat(messages, add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False)


def _jinja_environment():
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as error:
        raise ImportError("chat templates need jinja2 (pip install 'minimoe[hub]')") from error

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(value, indent=None):
        return json.dumps(value, ensure_ascii=False, indent=indent)

    # loopcontrols: {% break %} / {% continue %}, which published templates use (and the
    # runtimes that render them enable)
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


def _read_chat_template(folder: str, config: dict) -> Optional[str]:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as handle:
            template = handle.read()
    return template


# ----------------------------------------------------------------------------------------------
# minimoe's own models read bytes: a run folder says so in byte_tokenizer.json
# ----------------------------------------------------------------------------------------------
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
BYTE_TOKENIZER_KIND = "minimoe-bytes"


def byte_tokenizer_json() -> str:
    """The text of byte_tokenizer.json: token id = UTF-8 byte value (minimoe.data.ByteTokenizer)."""
    return json.dumps({"tokenizer": BYTE_TOKENIZER_KIND, "vocab_size": 256,
                       "note": "token id = byte value of the UTF-8 text (minimoe.data.ByteTokenizer)"},
                      indent=1)


def save_byte_tokenizer(folder: str | os.PathLike) -> str:
    """Write byte_tokenizer.json into ``folder`` (for a run folder written without one)."""
    path = os.path.join(os.fspath(folder), BYTE_TOKENIZER_FILE)
    with open(path, "w") as handle:
        handle.write(byte_tokenizer_json())
    return path


class ByteChatTokenizer:
    """The byte tokenizer with the interface of ``Tokenizer`` (encode, decode, a chat format).

    A byte model trained by ``minimoe train`` was never taught a conversation format, so its
    "chat template" is plain text -- ``User: ...`` / ``Assistant: `` lines -- and an answer
    ends at the end of its line (``chat_stop_token_id``, the newline byte): the model simply
    continues your line in the style of its training text."""

    vocab_size = 256
    bos_token = eos_token = None
    bos_token_id = eos_token_id = None  # plain generation runs to max_new_tokens
    chat_stop_token_id = ord("\n")
    chat_template = "User: {content}\nAssistant: {content}\n"  # rendered by render_chat

    def __init__(self, folder: str = "") -> None:
        self.folder = folder

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        lines = [f"{names.get(m['role'], m['role'].title())}: {m['content']}\n" for m in messages]
        return "".join(lines) + ("Assistant: " if add_generation_prompt else "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))


def _read_byte_tokenizer(folder: str) -> Optional[ByteChatTokenizer]:
    path = os.path.join(folder, BYTE_TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            kind = json.load(handle).get("tokenizer")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path} is not the JSON object minimoe writes: {error}") from error
    if kind != BYTE_TOKENIZER_KIND:
        raise ValueError(f"{path}: unknown tokenizer {kind!r}, expected {BYTE_TOKENIZER_KIND!r}")
    return ByteChatTokenizer(folder)


def _is_minimoe_run(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as handle:
            return "model_type" not in json.load(handle)
    except (OSError, ValueError, TypeError):
        return False


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint folder: tokenizer.json + tokenizer_config.json, or the
    byte tokenizer a minimoe run folder names in byte_tokenizer.json.

    Raises FileNotFoundError naming the missing file (and ImportError without ``tokenizers``).
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    byte_tokenizer = _read_byte_tokenizer(folder)
    if byte_tokenizer is not None and not os.path.exists(path):
        return byte_tokenizer
    if not os.path.exists(path) and _is_minimoe_run(folder):
        raise FileNotFoundError(
            f"{folder} is a minimoe run folder without {BYTE_TOKENIZER_FILE} (written before "
            "runs carried their tokenizer). minimoe's own models read UTF-8 bytes; write the "
            "file once with: python -c \"import minimoe.checkpoints.tokenizer as t; "
            f"t.save_byte_tokenizer('{folder}')\"")
    if not os.path.exists(path):
        present = sorted(n for n in os.listdir(folder) if "token" in n) if os.path.isdir(folder) else []
        raise FileNotFoundError(
            f"no tokenizer.json in {folder} (found: {present or 'no tokenizer files'}); minimoe "
            "reads the 'tokenizers' format only. A checkpoint with only a sentencepiece "
            "tokenizer.model can be converted once with transformers: "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError as error:
        raise ImportError("reading tokenizer.json needs the tokenizers package "
                          "(pip install 'minimoe[hub]')") from error
    try:
        backend = Backend.from_file(path)
    except Exception as error:
        raise ValueError(f"{path} is not a valid tokenizers file: {error}") from error
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = read_json(config_path) if os.path.exists(config_path) else {}
    tokenizer = Tokenizer(backend, config, _read_chat_template(folder, config), folder)
    for field in ("bos_token", "eos_token"):
        token = getattr(tokenizer, field)
        if token is not None and getattr(tokenizer, field + "_id") is None:
            raise ValueError(f"{config_path}: {field} {token!r} is not in the vocabulary of "
                             f"{path}")
    return tokenizer
