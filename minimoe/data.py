"""Data: a synthetic multi-domain corpus, a byte-level tokenizer, and batching.

Everything a toy MoE model trains on comes from this file. Nothing is downloaded: the
corpus is *written* by five small generator functions, seeded, so the same seed gives
the same bytes on every machine and in every process.

Why byte-level tokenisation
---------------------------
Real MoE models use BPE vocabularies of 100k+ tokens (DeepSeek-V3: 129,280). A
tokenizer has to be trained, shipped and versioned, and its vocabulary alone would
dwarf a ~1M-parameter toy (129,280 x 128 embedding weights = 16.5M parameters). A byte
tokenizer needs none of that:

* no training: the vocabulary is the 256 possible byte values, ``vocab_size = 256``;
* every language and every file works: any text is a sequence of UTF-8 bytes, so there
  is no "unknown token";
* the price is longer sequences for anything outside ASCII. UTF-8 spends 1 byte on an
  ASCII character, 2 on an Arabic letter (U+0600-U+06FF), 3 on most CJK characters and
  4 on an emoji. The Arabic domain below costs about 1.8 bytes per character (2 for
  each letter, 1 for each space): "ذهب الولد إلى المدرسة" is 21 characters and 39
  bytes.

That price is also a feature here: a byte-level model *sees* the script. Arabic text
is made of lead bytes 0xD8-0xDB followed by continuation bytes 0x80-0xBF, bytes that
never occur in the ASCII domains, so even the first layer's router can tell it apart.

Why several domains
-------------------
A router can only specialise experts if the data has structure to specialise on. On a
single homogeneous stream every expert sees the same statistics and load balancing
spreads tokens evenly over them; nothing interesting shows up in the routing plots.
DeepSeekMoE (Dai et al. 2024, arXiv:2401.06066) argues for fine-grained and shared
experts precisely so that each routed expert can hold more *specialised* knowledge, and
OLMoE (Muennighoff et al. 2024, arXiv:2409.02060, §5 "MoE Analysis") measures it: its
experts show strong domain specialisation (e.g. on arXiv and GitHub data) and
vocabulary specialisation. Mixtral (Jiang et al. 2024, §5 "Routing analysis") found
little specialisation by *topic* but clear specialisation by *syntax* (Python's
``self``, indentation tokens). So the domains here differ in surface syntax, which a
tiny model can pick up in minutes: after training, plot the fraction of each domain's
tokens sent to each expert (``Corpus.domains`` labels every token).

The five domains (``DOMAINS``), each a short readable function taking a
``random.Random``:

* ``prose``      English-like paragraphs from a small grammar: determiner, optional
                 adjective, noun, past-tense verb, object, prepositional phrases,
                 subordinate clauses ("..., because the dog slept."), questions
                 ("Did the old cat see a lamp?") and . ! ? punctuation.
* ``code``       one Python function: ``def`` with parameters, assignments with
                 arithmetic expressions, ``for`` loops, ``if``/``else``, 4-space
                 indentation and a ``return``. Every document parses with ``ast``.
* ``arithmetic`` lines ``a op b = c`` for + - * with *correct* results, so a model
                 can learn carries ("57 + 68 = 125").
* ``json``       records with string, integer, float, true/false/null values, nested
                 objects and lists; every document is valid JSON (``json.loads``).
* ``arabic``     verb-subject-object sentences from a small Arabic word list, with
                 gender agreement, Arabic comma "،", semicolon "؛" and question mark "؟".

Vocabularies are small (tens of words per domain) and the structure is regular, so a
~1M-parameter model trained for a few million bytes reaches a visibly lower loss and
its samples look like the domain they came from.

Layout of the token stream
--------------------------
Documents are concatenated, each followed by ``DOCUMENT_SEPARATOR = "\\n\\n"`` (a blank
line, as between paragraphs or functions; no document contains a blank line itself, so
the separator is unambiguous). The separator's two bytes are labelled with the domain of
the document they end. ``build_corpus`` draws the domain of each next document uniformly
at random, so documents from different domains follow each other and a training window
often crosses a domain boundary: the router has to switch mid-sequence.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

DOMAINS: tuple[str, ...] = ("prose", "code", "arithmetic", "json", "arabic")
DOCUMENT_SEPARATOR = "\n\n"

# =====================================================================================
# prose: a tiny English grammar
# =====================================================================================

DETERMINERS = ("the", "a", "every", "some", "this", "that", "one")
ADJECTIVES = ("small", "quiet", "old", "bright", "green", "heavy", "curious",
              "gentle", "tired", "happy", "cold", "round", "early", "wooden")
NOUNS = ("cat", "dog", "river", "teacher", "child", "garden", "machine", "bird",
         "city", "window", "letter", "farmer", "storm", "lamp", "road", "friend",
         "apple", "island", "engine", "owl")
# (past tense, base form): the base form is used in questions ("Did ... see ...?").
TRANSITIVE_VERBS = (("saw", "see"), ("found", "find"), ("followed", "follow"),
                    ("carried", "carry"), ("watched", "watch"), ("painted", "paint"),
                    ("helped", "help"), ("opened", "open"), ("forgot", "forget"),
                    ("visited", "visit"), ("built", "build"), ("lost", "lose"))
INTRANSITIVE_VERBS = ("slept", "laughed", "waited", "arrived", "sang", "vanished",
                      "smiled", "rested")
PREPOSITIONS = ("near", "under", "behind", "across", "beside", "inside", "above")
CONJUNCTIONS = ("because", "while", "after", "before", "when", "although")
ADVERBS = ("slowly", "quietly", "again", "today", "quickly", "at night")


def _noun_phrase(rng: random.Random, allow_pp: bool = True) -> str:
    words = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
    words.append(rng.choice(NOUNS))
    determiner = rng.choice(DETERMINERS)
    if determiner == "a" and words[0][0] in "aeiou":
        determiner = "an"
    phrase = " ".join([determiner] + words)
    if allow_pp and rng.random() < 0.2:  # "the lamp near the river"
        phrase += f" {rng.choice(PREPOSITIONS)} {_noun_phrase(rng, allow_pp=False)}"
    return phrase


def _clause(rng: random.Random) -> str:
    if rng.random() < 0.7:
        clause = f"{_noun_phrase(rng)} {rng.choice(TRANSITIVE_VERBS)[0]} {_noun_phrase(rng)}"
    else:
        clause = f"{_noun_phrase(rng)} {rng.choice(INTRANSITIVE_VERBS)}"
    if rng.random() < 0.25:
        clause += f" {rng.choice(ADVERBS)}"
    return clause


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.12:  # a question: "Did the old cat see a lamp?"
        verb = rng.choice(TRANSITIVE_VERBS)[1]
        text = f"did {_noun_phrase(rng)} {verb} {_noun_phrase(rng, allow_pp=False)}?"
    else:
        text = _clause(rng)
        if rng.random() < 0.35:  # a subordinate clause
            text += f", {rng.choice(CONJUNCTIONS)} {_clause(rng)}"
        text += "!" if rng.random() < 0.1 else "."
    return text[0].upper() + text[1:]


def generate_prose(rng: random.Random) -> str:
    """One or two paragraphs of 2-5 sentences each, paragraphs separated by one newline."""
    paragraphs = []
    for _ in range(rng.randint(1, 2)):
        paragraphs.append(" ".join(_sentence(rng) for _ in range(rng.randint(2, 5))))
    return "\n".join(paragraphs)


# =====================================================================================
# code: one Python-like function
# =====================================================================================

FUNCTION_VERBS = ("compute", "count", "find", "update", "scale", "merge", "check", "sum")
FUNCTION_NOUNS = ("total", "items", "values", "score", "index", "buffer", "limit", "steps")
PARAMETERS = ("items", "values", "n", "limit", "start", "scale")
LOCAL_NAMES = ("total", "count", "result", "value", "step", "left", "right", "size")
SEQUENCE_PARAMETERS = ("items", "values")  # parameters that can be looped over


def _expression(rng: random.Random, names: list[str], depth: int = 0) -> str:
    """An arithmetic expression over the numeric names in scope and small integers."""
    numbers = [name for name in names if name not in SEQUENCE_PARAMETERS]
    if depth >= 2 or rng.random() < 0.4:
        if numbers and rng.random() < 0.7:
            return rng.choice(numbers)
        return str(rng.randint(0, 20))
    left = _expression(rng, names, depth + 1)
    right = _expression(rng, names, depth + 1)
    text = f"{left} {rng.choice(('+', '-', '*', '//', '%'))} {right}"
    return f"({text})" if depth > 0 else text


def _block(rng: random.Random, names: list[str], indent: int, depth: int) -> list[str]:
    """1-3 statements at one indentation level; `names` grows as variables are bound."""
    pad = "    " * indent
    lines: list[str] = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if depth < 2 and kind < 0.25:  # for loop
            sequences = [p for p in SEQUENCE_PARAMETERS if p in names]
            if sequences and rng.random() < 0.5:
                loop_var = "item" if "item" not in names else "other"
                header = f"for {loop_var} in {rng.choice(sequences)}:"
            else:
                bound = rng.choice([p for p in ("n", "limit") if p in names] or ["10"])
                loop_var = "i" if "i" not in names else "j"
                header = f"for {loop_var} in range({bound}):"
            lines.append(pad + header)
            lines += _block(rng, names + [loop_var], indent + 1, depth + 1)
        elif depth < 2 and kind < 0.45:  # if / else
            comparison = rng.choice(("<", ">", "==", "!=", "<=", ">="))
            left, right = _expression(rng, names, 1), _expression(rng, names, 1)
            lines.append(f"{pad}if {left} {comparison} {right}:")
            lines += _block(rng, names, indent + 1, depth + 1)
            if rng.random() < 0.5:
                lines.append(pad + "else:")
                lines += _block(rng, names, indent + 1, depth + 1)
        elif kind < 0.7 and len(names) > 1:  # augmented assignment to a bound name
            target = rng.choice([n for n in names if n in LOCAL_NAMES] or names)
            operator = rng.choice(("+=", "-=", "*="))
            lines.append(f"{pad}{target} {operator} {_expression(rng, names)}")
        else:  # plain assignment, binds a new local name
            target = rng.choice(LOCAL_NAMES)
            lines.append(f"{pad}{target} = {_expression(rng, names)}")
            if target not in names:
                names.append(target)
    return lines


def generate_code(rng: random.Random) -> str:
    """One function: def line, an initial assignment, 1-3 statements, a return."""
    name = f"{rng.choice(FUNCTION_VERBS)}_{rng.choice(FUNCTION_NOUNS)}"
    parameters = rng.sample(PARAMETERS, rng.randint(1, 3))
    names = list(parameters)
    first = rng.choice(LOCAL_NAMES)
    lines = [f"def {name}({', '.join(parameters)}):", f"    {first} = {rng.randint(0, 9)}"]
    names.append(first)
    lines += _block(rng, names, indent=1, depth=0)
    lines.append(f"    return {rng.choice([n for n in names if n in LOCAL_NAMES])}")
    return "\n".join(lines)


# =====================================================================================
# arithmetic: correct sums, differences and products
# =====================================================================================

def _arithmetic_line(rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{a} + {b} = {a + b}"
    if op == "-":  # no negative results: a >= b
        a, b = sorted((rng.randint(0, 999), rng.randint(0, 999)), reverse=True)
        return f"{a} - {b} = {a - b}"
    a, b = rng.randint(0, 99), rng.randint(0, 12)
    return f"{a} * {b} = {a * b}"


def generate_arithmetic(rng: random.Random) -> str:
    """10-26 lines of `a op b = c`, one per line."""
    return "\n".join(_arithmetic_line(rng) for _ in range(rng.randint(10, 26)))


# =====================================================================================
# json: records
# =====================================================================================

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
CITIES = ("paris", "lagos", "lima", "oslo", "cairo", "tokyo", "quito", "perth")
TAGS = ("red", "blue", "new", "old", "fast", "slow", "admin", "guest")


def _json_record(rng: random.Random) -> dict:
    """A record; fields are chosen in a fixed order so the key order is regular."""
    record: dict = {"id": rng.randint(1, 9999), "name": rng.choice(NAMES)}
    if rng.random() < 0.6:
        record["age"] = rng.randint(18, 90)
    if rng.random() < 0.6:
        record["active"] = rng.random() < 0.5
    if rng.random() < 0.6:
        record["score"] = round(rng.random() * 100, 2)
    if rng.random() < 0.5:
        record["tags"] = rng.sample(TAGS, rng.randint(0, 3))
    if rng.random() < 0.4:
        record["manager"] = rng.choice(NAMES) if rng.random() < 0.5 else None
    if rng.random() < 0.4:
        record["address"] = {"city": rng.choice(CITIES), "zip": rng.randint(10000, 99999)}
    if rng.random() < 0.3:
        record["orders"] = [{"sku": f"A{rng.randint(100, 999)}", "qty": rng.randint(1, 9)}
                            for _ in range(rng.randint(1, 3))]
    return record


def generate_json(rng: random.Random) -> str:
    """One record, or a list of 2-4 records, serialised on one line."""
    if rng.random() < 0.3:
        return json.dumps(_json_record(rng))
    return json.dumps([_json_record(rng) for _ in range(rng.randint(2, 4))])


# =====================================================================================
# arabic: verb-subject-object sentences
# =====================================================================================

# (noun, is_feminine). All definite ("al-"), so adjectives take "al-" too.
ARABIC_NOUNS = (("الولد", False), ("البنت", True), ("المعلم", False), ("المعلمة", True),
                ("الطالب", False), ("الكتاب", False), ("البيت", False), ("المدرسة", True),
                ("الشمس", True), ("القمر", False), ("الباب", False), ("الطريق", False),
                ("النهر", False), ("الشجرة", True), ("المدينة", True), ("القلم", False),
                ("الرسالة", True), ("الحديقة", True))
# Masculine adjectives; the feminine adds taa marbuta "ة" (الكبير -> الكبيرة).
ARABIC_ADJECTIVES = ("الكبير", "الصغير", "الجميل", "الجديد", "القديم", "الطويل")
# Past-tense verbs whose feminine form adds "ت" (كتب -> كتبت).
ARABIC_TRANSITIVE = ("كتب", "قرأ", "فتح", "أكل", "وجد", "حمل", "سمع", "رسم")
ARABIC_INTRANSITIVE = ("ذهب", "دخل", "جلس", "خرج", "نام")
ARABIC_PREPOSITIONS = ("في", "إلى", "من", "على", "مع")
ARABIC_CONNECTORS = ("ثم", "لأن", "بينما")  # then, because, while
ARABIC_COMMA, ARABIC_SEMICOLON, ARABIC_QUESTION = "،", "؛", "؟"


def _arabic_noun_phrase(rng: random.Random) -> tuple[str, bool]:
    noun, feminine = rng.choice(ARABIC_NOUNS)
    if rng.random() < 0.4:
        noun += " " + rng.choice(ARABIC_ADJECTIVES) + ("ة" if feminine else "")
    return noun, feminine


def _arabic_clause(rng: random.Random) -> str:
    subject, feminine = _arabic_noun_phrase(rng)
    suffix = "ت" if feminine else ""  # verb agrees with the subject's gender
    if rng.random() < 0.6:
        words = [rng.choice(ARABIC_TRANSITIVE) + suffix, subject, _arabic_noun_phrase(rng)[0]]
    else:
        words = [rng.choice(ARABIC_INTRANSITIVE) + suffix, subject]
    if rng.random() < 0.5 or len(words) == 2:
        words += [rng.choice(ARABIC_PREPOSITIONS), _arabic_noun_phrase(rng)[0]]
    return " ".join(words)


def _arabic_sentence(rng: random.Random) -> str:
    if rng.random() < 0.12:
        return "هل " + _arabic_clause(rng) + ARABIC_QUESTION  # "hal": a yes/no question
    text = _arabic_clause(rng)
    if rng.random() < 0.35:
        text += ARABIC_COMMA + " " + rng.choice(ARABIC_CONNECTORS) + " " + _arabic_clause(rng)
    elif rng.random() < 0.1:
        text += ARABIC_SEMICOLON + " " + _arabic_clause(rng)
    return text + "."


def generate_arabic(rng: random.Random) -> str:
    """One or two paragraphs of 2-3 sentences, paragraphs separated by one newline."""
    paragraphs = []
    for _ in range(rng.randint(1, 2)):
        paragraphs.append(" ".join(_arabic_sentence(rng) for _ in range(rng.randint(2, 3))))
    return "\n".join(paragraphs)


# =====================================================================================
# the public entry points
# =====================================================================================

GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "prose": generate_prose,
    "code": generate_code,
    "arithmetic": generate_arithmetic,
    "json": generate_json,
    "arabic": generate_arabic,
}


def generate_document(domain: str, rng: random.Random) -> str:
    """One document of `domain`, drawn with `rng` (never contains a blank line)."""
    if domain not in GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    return GENERATORS[domain](rng)


class ByteTokenizer:
    """Text <-> UTF-8 bytes. Token id = byte value, so vocab_size = 256 and nothing to train."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Bytes -> text. errors="replace": a sample may stop inside a multi-byte
        character (or a model may emit an invalid byte sequence); that shows as U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """A token stream with the domain of every token.

    tokens:       (N,) uint8 byte values (the token ids).
    domains:      (N,) int8 index into `domain_names` of the document each token came from.
    domain_names: the names behind those indices.
    """

    tokens: torch.Tensor
    domains: torch.Tensor
    domain_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.domains.shape != self.tokens.shape:
            raise ValueError(f"tokens and domains must be 1-D of the same length, got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.domains.shape)}")

    def __len__(self) -> int:
        return self.tokens.numel()

    def split(self, fraction_val: float) -> tuple["Corpus", "Corpus"]:
        """(train, val): the last `fraction_val` of the stream is the validation set."""
        if not 0.0 < fraction_val < 1.0:
            raise ValueError(f"fraction_val must be in (0, 1), got {fraction_val}")
        n_train = len(self) - int(round(len(self) * fraction_val))
        train = Corpus(self.tokens[:n_train], self.domains[:n_train], self.domain_names)
        val = Corpus(self.tokens[n_train:], self.domains[n_train:], self.domain_names)
        return train, val

    def domain_fractions(self) -> dict[str, float]:
        """Share of the tokens from each domain, e.g. {"prose": 0.21, ...}."""
        counts = torch.bincount(self.domains.long(), minlength=len(self.domain_names))
        total = max(len(self), 1)
        return {name: counts[i].item() / total for i, name in enumerate(self.domain_names)}


def build_corpus(num_tokens: int, seed: int = 0, domains=DOMAINS) -> Corpus:
    """Exactly `num_tokens` bytes of documents; each document's domain is drawn uniformly
    at random from `domains`. Deterministic: only `random.Random(seed)` is used, so the
    same seed gives identical bytes in every process (no global RNG, no hash()).
    The last document is cut at `num_tokens` (possibly inside a multi-byte character)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    domains = tuple(domains)
    if not domains:
        raise ValueError("domains must not be empty")
    for name in domains:
        if name not in GENERATORS:
            raise ValueError(f"unknown domain {name!r}; choose from {DOMAINS}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domain in {domains}")

    rng = random.Random(seed)
    pieces: list[bytes] = []
    labels: list[int] = []
    lengths: list[int] = []
    total = 0
    while total < num_tokens:
        index = rng.randrange(len(domains))
        piece = (generate_document(domains[index], rng) + DOCUMENT_SEPARATOR).encode("utf-8")
        pieces.append(piece)
        labels.append(index)
        lengths.append(len(piece))
        total += len(piece)

    stream = bytearray(b"".join(pieces)[:num_tokens])
    tokens = torch.frombuffer(stream, dtype=torch.uint8)  # (N,) shares memory with `stream`
    domain_ids = torch.repeat_interleave(torch.tensor(labels, dtype=torch.int8),
                                         torch.tensor(lengths))[:num_tokens]  # (N,)
    return Corpus(tokens, domain_ids.contiguous(), domains)


def load_text_corpus(path: str) -> Corpus:
    """Any UTF-8 text file as a corpus with one domain, named after the file's stem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no text file at {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{path!r} is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path!r} is not valid UTF-8 "
                         f"(byte {error.start}: {error.reason})") from None
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (N,)
    name = os.path.splitext(os.path.basename(path))[0]
    return Corpus(tokens, torch.zeros(len(data), dtype=torch.int8), (name,))


def check_corpus_size(num_tokens: int, seq_len: int, val_fraction: float, source: str) -> None:
    """A corpus of num_tokens byte tokens, split (1 - val_fraction) / val_fraction, must give
    each part one (input, target) window of seq_len + 1 tokens; the error says how many bytes
    are needed."""
    def fits(n: int) -> bool:
        n_val = int(round(n * val_fraction))  # as Corpus.split rounds
        return n_val >= seq_len + 1 and n - n_val >= seq_len + 1

    if fits(num_tokens):
        return
    needed = max(1, int((seq_len + 0.5) / val_fraction) - 2)
    while not fits(needed):
        needed += 1
    raise ValueError(f"{source} has {num_tokens:,} bytes (= tokens: one byte is one token); "
                     f"training with --seq-len {seq_len} needs at least {needed:,}: "
                     f"{val_fraction:.0%} is held out for validation, and each part must hold "
                     f"one window of seq_len + 1 = {seq_len + 1} tokens. Use a longer text or "
                     "a smaller --seq-len")


def _check_lengths(corpus: Corpus, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if len(corpus) < seq_len + 1:
        raise ValueError(f"corpus has {len(corpus)} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1} needed for one (input, target) window")


def _windows(corpus: Corpus, starts: torch.Tensor, seq_len: int):
    """Rows tokens[s : s + T + 1] for each start s -> (inputs, targets, domains), (B, T) long."""
    index = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
    window = corpus.tokens[index].long()  # (B, T+1)
    inputs, targets = window[:, :-1], window[:, 1:]  # (B, T) each; targets[t] = inputs[t+1]
    domains = corpus.domains[index[:, :-1]].long()  # (B, T) domain of each *input* token
    return inputs, targets, domains


def sample_batch(corpus: Corpus, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows for training: (input_ids, targets, domains), each (B, T) long.

    targets are input_ids shifted by one (the next byte); domains labels each input
    token, which is what the router sees, for per-domain routing statistics."""
    _check_lengths(corpus, batch_size, seq_len)
    # Window start s needs s + seq_len <= N - 1, so s in [0, N - seq_len).
    starts = torch.randint(0, len(corpus) - seq_len, (batch_size,), generator=generator)  # (B,)
    return _windows(corpus, starts, seq_len)


def iterate_eval_batches(corpus: Corpus, batch_size: int, seq_len: int) -> Iterator:
    """Deterministic, non-overlapping windows for validation loss, in stream order.

    Window k predicts targets k*T+1 .. k*T+T, so every token after the first is a target
    exactly once, except a tail of fewer than seq_len tokens that does not fill a window.
    The last batch may have fewer than batch_size rows."""
    _check_lengths(corpus, batch_size, seq_len)
    n_windows = (len(corpus) - 1) // seq_len
    all_starts = torch.arange(n_windows) * seq_len  # (n_windows,)
    for first in range(0, n_windows, batch_size):
        yield _windows(corpus, all_starts[first:first + batch_size], seq_len)


# =====================================================================================
# passkey retrieval: a long-range copy task (used by minimoe.experiments.long_context)
# =====================================================================================

PASSKEY_STATEMENT = "The passkey is {key}. "
PASSKEY_QUESTION = "What is the passkey? {key}"


def generate_passkey_document(rng: random.Random, num_bytes: int, depth: float | None = None,
                              key_digits: int = 5) -> tuple[str, str]:
    """(document, key): exactly `num_bytes` ASCII bytes that end with the answer.

    Layout (Mohtashami & Jaggi 2023, "Landmark Attention", §4.2, in miniature):

        <prose filler> The passkey is 48213. <prose filler> What is the passkey? 48213

    The key is `key_digits` random digits; the prose filler (from ``generate_prose``)
    holds no digits, so the last `key_digits` bytes can only be predicted by finding the
    statement and copying from it. `depth` in [0, 1] places the statement within the
    filler (0 = at the start, 1 = just before the question); None draws it uniformly.
    """
    key = "".join(rng.choice("0123456789") for _ in range(key_digits))
    statement = PASSKEY_STATEMENT.format(key=key)
    question = PASSKEY_QUESTION.format(key=key)
    filler_bytes = num_bytes - len(statement) - len(question)
    if filler_bytes < 0:
        raise ValueError(f"num_bytes={num_bytes} is shorter than the statement and question "
                         f"({len(statement) + len(question)} bytes)")
    filler = ""
    while len(filler) < filler_bytes:
        filler += generate_prose(rng).replace("\n", " ") + " "
    filler = filler[:filler_bytes]
    if depth is None:
        depth = rng.random()
    split = int(round(depth * filler_bytes))
    document = filler[:split] + statement + filler[split:] + question
    return document, key


def passkey_batch(rng: random.Random, batch_size: int, seq_len: int, depth: float | None = None,
                  key_digits: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), each (B, seq_len) long, from documents of seq_len + 1 bytes.

    The key is the last `key_digits` targets of every row: targets[:, -key_digits:]."""
    rows = [generate_passkey_document(rng, seq_len + 1, depth, key_digits)[0].encode("ascii")
            for _ in range(batch_size)]
    window = torch.tensor([list(row) for row in rows], dtype=torch.long)  # (B, T+1)
    return window[:, :-1], window[:, 1:]  # (B, T) each
