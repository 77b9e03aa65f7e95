"""Tests for minimoe.data: determinism, domain labels, tokenizer, histograms, batching, files."""

import ast
import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minimoe
from minimoe import data
from minimoe.data import (
    DOCUMENT_SEPARATOR,
    DOMAINS,
    ByteTokenizer,
    Corpus,
    build_corpus,
    generate_document,
    iterate_eval_batches,
    load_text_corpus,
    sample_batch,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(minimoe.__file__)))


def _digest(corpus: Corpus) -> str:
    raw = corpus.tokens.numpy().tobytes() + corpus.domains.numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes():
    a, b = build_corpus(20_000, seed=7), build_corpus(20_000, seed=7)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.domains, b.domains)


def test_different_seeds_differ():
    assert not torch.equal(build_corpus(5_000, seed=0).tokens, build_corpus(5_000, seed=1).tokens)


def test_same_bytes_in_another_process_with_another_hash_seed():
    """Only random.Random(seed) is used: string hashing (PYTHONHASHSEED) must not matter."""
    code = ("import hashlib; from minimoe.data import build_corpus; c = build_corpus(20_000, seed=3); "
            "print(hashlib.sha256(c.tokens.numpy().tobytes() + c.domains.numpy().tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(build_corpus(20_000, seed=3))


def test_exact_length_and_dtypes():
    corpus = build_corpus(12_345, seed=0)
    assert len(corpus) == 12_345
    assert corpus.tokens.dtype == torch.uint8 and corpus.domains.dtype == torch.int8
    assert corpus.domain_names == DOMAINS


# ---------------------------------------------------------------- domain labels match the text

PROSE_WORDS = set(data.DETERMINERS + data.ADJECTIVES + data.NOUNS + data.INTRANSITIVE_VERBS
                  + data.PREPOSITIONS + data.CONJUNCTIONS + ("an", "did", "at", "night")
                  + tuple(itertools.chain.from_iterable(data.TRANSITIVE_VERBS))
                  + tuple(a for a in data.ADVERBS if " " not in a))
ARITHMETIC_LINE = re.compile(r"^(\d+) ([+*-]) (\d+) = (\d+)$")


def _check_prose(doc):
    for sentence in re.split(r"(?<=[.!?]) |\n", doc):
        assert sentence[0].isupper() and sentence[-1] in ".!?", sentence
        words = re.sub(r"[,.!?]", "", sentence).lower().split()
        assert set(words) <= PROSE_WORDS, sentence


def _check_code(doc):
    tree = ast.parse(doc)
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef)


def _check_arithmetic(doc):
    for line in doc.split("\n"):
        a, op, b, c = ARITHMETIC_LINE.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, line


def _check_json(doc):
    value = json.loads(doc)
    records = value if isinstance(value, list) else [value]
    assert all(isinstance(r, dict) and "id" in r for r in records)


def _check_arabic(doc):
    assert all("\u0600" <= ch <= "\u06ff" or ch in " .\n" for ch in doc), doc
    assert sum("\u0621" <= ch <= "\u064a" for ch in doc) > len(doc) / 2


CHECKERS = {"prose": _check_prose, "code": _check_code, "arithmetic": _check_arithmetic,
            "json": _check_json, "arabic": _check_arabic}


@pytest.mark.parametrize("domain", DOMAINS)
def test_generated_documents_are_well_formed(domain):
    rng = random.Random(0)
    for _ in range(300):
        doc = generate_document(domain, rng)
        assert DOCUMENT_SEPARATOR not in doc and doc.strip() == doc
        CHECKERS[domain](doc)


def test_labels_line_up_with_text():
    """Cut the stream where the label changes: each run decodes (strictly) to whole
    documents of that run's domain, each ending with the separator."""
    corpus = build_corpus(60_000, seed=11)
    labels = corpus.domains.tolist()
    raw = corpus.tokens.numpy().tobytes()
    changes = [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    boundaries = [0] + changes + [len(labels)]
    seen = set()
    for k, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        last_run = k == len(boundaries) - 2
        if last_run:
            continue  # the final document is cut at num_tokens
        text = raw[start:end].decode("utf-8")  # strict: a run never splits a character
        assert text.endswith(DOCUMENT_SEPARATOR)
        domain = corpus.domain_names[labels[start]]
        for doc in text[: -len(DOCUMENT_SEPARATOR)].split(DOCUMENT_SEPARATOR):
            CHECKERS[domain](doc)
        seen.add(domain)
    assert seen == set(DOMAINS)


def test_domain_shares_are_balanced():
    shares = build_corpus(200_000, seed=0).domain_fractions()
    assert set(shares) == set(DOMAINS)
    assert all(0.12 < share < 0.28 for share in shares.values()), shares


def test_subset_of_domains_and_unknown_domain():
    corpus = build_corpus(5_000, seed=0, domains=("arithmetic", "arabic"))
    assert corpus.domain_names == ("arithmetic", "arabic")
    assert set(corpus.domains.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="klingon"):
        build_corpus(100, domains=("prose", "klingon"))
    with pytest.raises(ValueError, match=r"klingon.*prose.*arabic"):
        generate_document("klingon", random.Random(0))


# ---------------------------------------------------------------- byte statistics


def test_domain_byte_histograms_are_distinct():
    """Total-variation distance between the byte distributions of every pair of domains.

    TV = 1/2 sum_b |p(b) - q(b)| is the largest difference in probability the two
    domains give to any set of bytes: TV > 0.3 means a classifier looking at single
    bytes alone already tells the pair apart far above chance, i.e. a router has a
    domain cue even in the first layer. The closest pair is prose vs code (~0.42,
    both lowercase English words); arabic vs anything is ~0.9 (disjoint byte ranges).
    """
    corpus = build_corpus(200_000, seed=0)
    histograms = []
    for index in range(len(DOMAINS)):
        domain_bytes = corpus.tokens[corpus.domains == index].long()
        counts = torch.bincount(domain_bytes, minlength=256).double()
        histograms.append(counts / counts.sum())
    for i, j in itertools.combinations(range(len(DOMAINS)), 2):
        tv = 0.5 * (histograms[i] - histograms[j]).abs().sum().item()
        assert tv > 0.3, (DOMAINS[i], DOMAINS[j], tv)


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["hello, world\n", "ذهب الولد إلى المدرسة؟", "MoE 🤖🚀 ok", ""])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_tokenizer_byte_costs_and_partial_characters():
    tok = ByteTokenizer()
    assert len(tok.encode("a")) == 1 and len(tok.encode("ب")) == 2 and len(tok.encode("🤖")) == 4
    assert tok.decode(tok.encode("🤖")[:2]) == "\ufffd"  # cut inside a character: no crash


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_tokenizer_round_trip_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------- batching


def test_sample_batch_shapes_and_shift():
    corpus = build_corpus(10_000, seed=0)
    x, y, d = sample_batch(corpus, 6, 42, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == d.shape == (6, 42)
    assert x.dtype == y.dtype == d.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = corpus.tokens.long()
    for row in range(6):  # each row is a contiguous window of the stream
        matches = [s for s in range(len(corpus) - 42) if torch.equal(stream[s:s + 42], x[row])]
        assert matches
        s = matches[0]
        assert torch.equal(stream[s + 1:s + 43], y[row])
        assert torch.equal(corpus.domains[s:s + 42].long(), d[row])


def test_sample_batch_is_reproducible_and_reaches_the_end():
    corpus = build_corpus(300, seed=0)
    a = sample_batch(corpus, 4, 16, torch.Generator().manual_seed(5))
    b = sample_batch(corpus, 4, 16, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # The smallest legal corpus (seq_len + 1 tokens) has exactly one window.
    x, y, _ = sample_batch(corpus, 3, len(corpus) - 1, torch.Generator().manual_seed(0))
    assert torch.equal(y[0], corpus.tokens[1:].long()) and torch.equal(x[1], x[0])


def test_too_short_corpus_raises():
    corpus = build_corpus(10, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        sample_batch(corpus, 2, 10, torch.Generator())
    with pytest.raises(ValueError, match="seq_len"):
        next(iterate_eval_batches(corpus, 2, 10))


def test_eval_batches_cover_the_corpus_once():
    corpus = build_corpus(1_000, seed=0)
    T, B = 16, 5
    batches = list(iterate_eval_batches(corpus, B, T))
    n_windows = (len(corpus) - 1) // T  # 62 windows: 12 full batches and one of 2 rows
    assert [b[0].shape[0] for b in batches] == [B] * (n_windows // B) + [n_windows % B]
    targets = torch.cat([y.reshape(-1) for _, y, _ in batches])
    inputs = torch.cat([x.reshape(-1) for x, _, _ in batches])
    assert torch.equal(targets, corpus.tokens[1:1 + n_windows * T].long())
    assert torch.equal(inputs, corpus.tokens[:n_windows * T].long())
    again = list(iterate_eval_batches(corpus, B, T))
    assert all(torch.equal(u, v) for a, b in zip(batches, again) for u, v in zip(a, b))


def test_split_takes_validation_from_the_end():
    corpus = build_corpus(1_000, seed=0)
    train, val = corpus.split(0.1)
    assert (len(train), len(val)) == (900, 100)
    assert torch.equal(torch.cat([train.tokens, val.tokens]), corpus.tokens)
    assert torch.equal(val.domains, corpus.domains[900:])
    assert train.domain_names == val.domain_names == DOMAINS
    with pytest.raises(ValueError):
        corpus.split(1.0)


# ---------------------------------------------------------------- text files


def test_load_text_corpus(tmp_path):
    text = "first line\nسطر عربي\n🤖\n"
    path = tmp_path / "my_notes.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_text_corpus(str(path))
    assert corpus.domain_names == ("my_notes",)
    assert ByteTokenizer().decode(corpus.tokens) == text
    assert len(corpus) == len(text.encode("utf-8")) and corpus.domains.eq(0).all()


def test_load_text_corpus_errors(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_text_corpus(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt"):
        load_text_corpus(str(empty))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        load_text_corpus(str(bad))
