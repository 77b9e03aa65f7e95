"""A newcomer's first hour, in a fresh folder: train the toy a few steps, generate from it, chat
two lines on stdin, speculative decoding, a LoRA fine-tune (merged and not) that can be
talked to as well, then train another preset -- and nothing was overwritten on the way."""

import hashlib
import io
import os

import pytest

from minimoe import cli


def digest(folder) -> dict:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def run(capsys, *argv, stderr=False):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return (captured.out, captured.err) if stderr else captured.out


def test_the_first_hour(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = run(capsys, "train", "--steps", "5", "--no-progress")
    assert "talk to it: minimoe chat runs/toy" in out
    assert os.path.exists("runs/toy/routing_by_domain.png")
    assert not os.path.exists("figures")  # the README's figures are not touched
    toy = digest("runs/toy")

    out = run(capsys, "generate", "runs/toy", "--prompt", "def ", "--max-new-tokens", "12")
    assert out.startswith("def ") and len(out.encode("utf-8", "replace")) >= 4
    out, err = run(capsys, "generate", "runs/toy", "--prompt", "The ", "--max-new-tokens", "12",
                   "--speculative", stderr=True)
    assert out.startswith("The ") and "speculative:" in err  # the toy's MTP module drafts

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nwhat is 12 + 3?\n"))
    out = run(capsys, "chat", "runs/toy", "--max-new-tokens", "16")
    assert len(out.splitlines()) == 2  # one answer line per message (byte chat ends at \n)

    (tmp_path / "notes.txt").write_text("the toy model reads bytes. " * 200, encoding="utf-8")
    out = run(capsys, "finetune", "runs/toy", "--data", "notes.txt", "--steps", "3",
              "--eval-every", "0", "--merge", "--no-progress")
    lora_dir = os.path.join("runs", "toy-lora-notes")
    assert f"talk to it: minimoe chat {os.path.join(lora_dir, 'merged')}" in out
    for folder in (lora_dir, os.path.join(lora_dir, "merged")):
        out = run(capsys, "generate", folder, "--prompt", "the ", "--max-new-tokens", "8")
        assert out.startswith("the ")

    out = run(capsys, "train", "--preset", "toy-classic", "--steps", "5", "--no-progress")
    assert "talk to it: minimoe chat runs/toy-classic" in out
    assert os.path.exists("runs/toy-classic/routing_by_domain.png")
    # training the toy again without --overwrite is refused
    assert cli.main(["train", "--steps", "5", "--no-progress"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert digest("runs/toy") == toy
    assert not os.path.exists("figures")
