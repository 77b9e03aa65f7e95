"""A run folder is never lost: bad arguments are refused before any work, nothing is
overwritten unless asked, --resume checks the saved settings, and every state a kill can
leave inside a save is recovered to the last complete checkpoint."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from minimoe import cli, run_folder
from minimoe.train import TrainArgs, _plan, learning_rate, run_training, train
from test_train import TINY, tiny_args


def folder_digest(folder) -> dict:
    """{file name: sha256} of every file in a folder (what "untouched" means)."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A complete 6-step run folder (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("saved")
    train(tiny_args(root, steps=6, eval_every=0))
    return root / "run"


def copy_run(saved_run, tmp_path):
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def tiny_cli(*args):
    return list(args) + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")] + [
        "--batch-size", "8", "--seq-len", "32", "--no-progress", "--eval-every", "0"]


# ------------------------------------------------------------------------------------------
# arguments are checked before any work; the error names the flag
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be a whole number >= 1, got 0"),
    (["--steps", "-1"], "--steps must be a whole number >= 1, got -1"),
    (["--grad-accum", "0"], "--grad-accum must be a whole number >= 1, got 0"),
    (["--set", "n_experts=4"], "ModelConfig has no field 'n_experts'; did you mean"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--resume", "--overwrite"], "choose one"),
])
def test_bad_arguments_leave_an_existing_run_untouched(saved_run, tmp_path, capsys, flags,
                                                       message):
    run = copy_run(saved_run, tmp_path)
    before = folder_digest(run)
    assert cli.main(["train", "--out", str(run), "--no-progress"] + flags) == 2
    err = capsys.readouterr().err
    assert message in err
    if "n_experts" in flags[-1]:
        assert "n_routed_experts" in err  # the close match is suggested
    assert folder_digest(run) == before


def test_too_small_data_file_says_how_many_bytes_are_needed(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("x" * 2400, encoding="utf-8")  # 2.4 KB: 120 validation bytes < 129
    assert cli.main(["train", "--data", str(text), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    # by hand: the validation part is round(0.05 n) >= 129 bytes from n = 2571 on
    assert "has 2,400 bytes" in err and "needs at least 2,571" in err and "--seq-len 128" in err
    assert not (tmp_path / "run").exists()
    text.write_text("x" * 2571, encoding="utf-8")  # exactly enough: no error from the check
    from minimoe.data import check_corpus_size
    check_corpus_size(2571, 128, 0.05, "--data")


def test_a_new_run_never_overwrites_an_existing_one(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path)
    before = folder_digest(run)
    assert cli.main(["train", "--out", str(run), "--steps", "2"] + tiny_cli()[:-7]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert folder_digest(run) == before
    # --overwrite replaces it (and the old run stays complete until the new one is saved)
    assert cli.main(["train", "--out", str(run), "--steps", "2", "--overwrite"]
                    + tiny_cli()) == 0
    assert run_folder.read_state(str(run))["step"] == 2


def test_a_folder_of_other_files_is_never_a_run_folder(tmp_path, capsys):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "todo.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["train", "--out", str(notes), "--steps", "2"] + extra + tiny_cli()) == 2
        assert "not a minimoe run folder" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "keep me" and (notes / "sub").is_dir()


def test_resume_checks_the_saved_settings(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path)
    before = folder_digest(run)
    assert cli.main(["train", "--resume", "--out", str(run), "--preset", "toy-classic"]) == 2
    err = capsys.readouterr().err
    assert "--preset 'toy' (saved) vs 'toy-classic'" in err
    assert cli.main(["train", "--resume", "--out", str(run), "--set",
                     "n_routed_experts=4"]) == 2
    assert "n_routed_experts 8 (saved) vs 4" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(run), "--seq-len", "16"]) == 2
    assert "--seq-len 32 (saved) vs 16" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(run) + "-typo"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(run)]) == 2  # saved steps=6, at step 6
    assert "already at step 6" in capsys.readouterr().err
    assert folder_digest(run) == before
    # without the contradicting flags, --resume takes the saved settings and continues
    assert cli.main(["train", "--resume", "--out", str(run), "--steps", "8", "--no-progress"]) == 0
    state = run_folder.read_state(str(run))
    assert state["step"] == 8 and state["args"]["seq_len"] == 32
    assert [h["step"] for h in state["history"]] == list(range(1, 9))


def test_default_out_names_the_preset_and_the_data():
    from minimoe.train import default_out_dir

    assert default_out_dir("toy") == os.path.join("runs", "toy")
    assert default_out_dir("toy-classic") == os.path.join("runs", "toy-classic")
    assert default_out_dir("toy", "texts/my.txt") == os.path.join("runs", "toy-my")
    assert default_out_dir("toy", None, {"aux_loss_alpha": 0.01, "fp8": True}) == os.path.join(
        "runs", "toy-aux_loss_alpha=0.01-fp8=true")


# ------------------------------------------------------------------------------------------
# recovery after a kill inside a save
# ------------------------------------------------------------------------------------------
def test_recover_every_state_a_kill_can_leave(saved_run, tmp_path):
    def complete(folder, step):
        shutil.copytree(saved_run, folder)
        state = run_folder.read_state(str(folder))
        state["step"] = step
        (folder / "train_state.json").write_text(json.dumps(state))

    run, tmp, old = tmp_path / "run", tmp_path / "run.tmp", tmp_path / "run.old"
    # killed while writing the new one: the old one stays, the partial one goes
    complete(run, 6)
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert run_folder.recover(str(run)) == str(run)
    assert run_folder.read_state(str(run))["step"] == 6 and not tmp.exists()
    # killed between the two renames: no run/, a complete .tmp (newer) and .old
    shutil.move(run, old)
    complete(tmp, 9)
    run_folder.recover(str(run))
    assert run_folder.read_state(str(run))["step"] == 9 and not tmp.exists() and not old.exists()
    # the same, but .tmp incomplete: .old comes back
    shutil.move(run, old)
    shutil.copytree(old, tmp)
    (tmp / "train_state.json").unlink()
    run_folder.recover(str(run))
    assert run_folder.read_state(str(run))["step"] == 9 and not tmp.exists() and not old.exists()
    # killed before deleting .old: the new one stays, .old goes
    complete(old, 3)
    run_folder.recover(str(run))
    assert run_folder.read_state(str(run))["step"] == 9 and not old.exists()


def test_a_save_keeps_files_the_run_wrote_beside_it(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    (run / "routing_by_domain.png").write_bytes(b"figure")
    train(tiny_args(tmp_path, steps=8, eval_every=0, resume=True))
    assert (run / "routing_by_domain.png").read_bytes() == b"figure"


def test_optimizer_state_round_trips_through_safetensors(saved_run):
    from minimoe.train import load_checkpoint, make_optimizer

    model = load_checkpoint(str(saved_run))
    optimizer = make_optimizer(model, TrainArgs())
    generator = torch.Generator()
    run_folder.load_training_state(str(saved_run), model, optimizer, {"data": generator})
    assert len(optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)
    for parameter in model.parameters():
        state = optimizer.state[parameter]
        assert int(state["step"]) == 6 and state["exp_avg_sq"].abs().sum() > 0
    # no file of a run folder is a pickle
    for name in os.listdir(saved_run):
        assert not (saved_run / name).read_bytes().startswith(b"\x80")


# ------------------------------------------------------------------------------------------
# the schedule under a time budget, and an honest stop
# ------------------------------------------------------------------------------------------
def test_plan_fits_the_budget():
    args = TrainArgs(steps=1500, max_minutes=4)
    # 22 steps done after 5 s, 0.2 s per step: 0.95 * (240 - 5) / 0.2 = 1116 more steps
    assert _plan(22, 1500, 0.2, 5.0, args) == 22 + 1116
    assert _plan(22, 1500, 0.01, 5.0, args) == 1500  # a fast machine trains what was asked
    assert _plan(22, 1500, 1000.0, 5.0, args) == 23  # at least one more step
    # the schedule follows the plan: the cosine reaches min_lr at the planned step
    assert learning_rate(1137, args, 1138) == pytest.approx(args.min_lr, rel=1e-4)


def test_a_time_limit_stop_says_so_and_resumes(tmp_path, capsys):
    result = run_training(tiny_args(tmp_path, steps=200, eval_every=0, max_minutes=1e-9))
    assert result.stopped == "time limit" and len(result.history) == 1
    out = capsys.readouterr().out
    assert f"stopped at step 1 of 200 after" in out
    assert f"resume with: minimoe train --resume --out {tmp_path / 'run'}" in out
    assert "val_loss" in result.history[-1]
    resumed = run_training(tiny_args(tmp_path, steps=200, eval_every=0, resume=True,
                                     max_minutes=1e-9))
    assert [h["step"] for h in resumed.history] == [1, 2]


def test_a_time_budget_plans_the_schedule(tmp_path, capsys, monkeypatch):
    """A run asked for far more steps than fit: after measuring its speed it plans where the
    cosine ends, every later step follows that plan, and the schedule finishes in budget.

    The loop's clock is replaced by one that advances 0.01 s per reading; the loop reads it
    three times per step (step start, step time, end of step), so a step "takes" 0.03 s.
    By hand: the plan comes after 22 steps (2 warm-up + 20 measured) at 0.66 s of a 6 s
    budget; 0.95 * (6 - 0.66) / 0.03 = 169.1 more steps fit, so the schedule ends at 191."""
    from minimoe import train as train_module

    clock = {"now": 0.0}

    def fake_clock():
        clock["now"] += 0.01
        return clock["now"]

    monkeypatch.setattr(train_module.time, "perf_counter", fake_clock)
    args = tiny_args(tmp_path, steps=100_000, eval_every=0, max_minutes=0.1, save=False)
    result = run_training(args)
    assert result.schedule_steps == 191 and result.stopped == "finished"
    assert "planned 191 of the 100000 steps asked for" in capsys.readouterr().out
    assert len(result.history) == 191
    for record in result.history[22:]:
        assert record["lr"] == learning_rate(record["step"] - 1, args, 191)
    assert result.history[-1]["lr"] == pytest.approx(args.min_lr, rel=0.01)


def test_generate_finds_a_run_folder_a_kill_left_inside_a_save(saved_run, tmp_path, capsys):
    shutil.copytree(saved_run, tmp_path / "run.old")  # killed between the two renames
    assert cli.main(["generate", str(tmp_path / "run"), "--prompt", "ab",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run.old").exists()
