"""Every `minimoe ...` command the README shows exists: each parses with the real parser, every
`python -m minimoe.X` names a module that exists, and the quick ones run (on a small run folder
standing in for the one the main job trains)."""

import importlib.util
import io
import os
import re
import shlex

import pytest

from minimoe import cli
from test_train import TINY

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_commands() -> list[list[str]]:
    """Argument lists of every minimoe / python -m command in the README's code (blocks and
    inline spans); a line chained with && gives one command per part."""
    text = open(README, encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line for line in block.splitlines() if line.strip()]
    lines += re.findall(r"`(!?(?:\.venv/bin/)?minimoe [^`]*)`", text)
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            for i, word in enumerate(words):
                name = os.path.basename(word.lstrip("!"))
                if name == "minimoe" or (word == "-m" and words[i + 1].startswith("minimoe")):
                    commands.append(words[i:] if word == "-m" else ["minimoe"] + words[i + 1:])
                    break
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands():
    names = {c[1] for c in COMMANDS if c[0] == "minimoe"}
    assert {"train", "generate", "chat", "finetune", "sizing", "convert"} <= names
    assert len([c for c in COMMANDS if c[0] == "-m"]) >= 10


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c)[:60])
def test_every_readme_command_exists(command):
    if command[0] == "-m":
        assert importlib.util.find_spec(command[1]) is not None, command
        return
    cli.build_parser().parse_args(command[1:])  # argparse exits (an error) on a bad command


def test_help_lists_only_real_commands(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "sample" not in out
    assert "{train,finetune,sizing,generate,chat,convert}" in out


def test_max_minutes_is_in_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-minutes MAX_MINUTES time budget of the training loop, in minutes (default: 4" in out


def test_the_quick_readme_commands_run(tmp_path, monkeypatch, capsys):
    """sizing, and generate / chat on runs/toy (a few-step run stands in for the main job's)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--out", "runs/toy", "--steps", "3", "--batch-size", "4",
                     "--seq-len", "32", "--eval-every", "0", "--no-progress"]
                    + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]) == 0
    quick = [c for c in COMMANDS if c[0] == "minimoe" and (
        c[1] == "sizing" or (c[1] in ("generate", "chat") and c[2] == "runs/toy"))]
    assert any(c[1] == "chat" for c in quick) and any("--speculative" in c for c in quick)
    for command in quick:
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
        capsys.readouterr()
        assert cli.main(command[1:]) == 0, (command, capsys.readouterr().err)
        assert capsys.readouterr().out.strip()
