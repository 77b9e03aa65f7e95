"""Kill a real training process (SIGKILL, no chance to clean up) at random points and inside
its saves, resume each time, and check that at most the save interval was lost and that the
resumed run's loss curve is the uninterrupted run's, bit for bit. SIGTERM saves and exits."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from minimoe import run_folder
from test_train import TINY

SAVE_EVERY = 3
STEPS = 30

# One training process: the tiny model, a save every SAVE_EVERY steps, each finished step
# appended to a log file (read by the test after the kill).
SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from minimoe.train import TrainArgs, train
out, log, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
args = TrainArgs(preset="toy", config_overrides={tiny!r}, corpus_tokens=40_000, out_dir=out,
                 steps={steps}, batch_size=8, seq_len=32, warmup_steps=5, eval_every=10,
                 eval_batches=2, save_every={save_every}, progress=False, resume=resume)
def log_step(record):
    with open(log, "a") as handle:
        handle.write(f"{{record['step']}}\\n")
train(args, on_step=log_step)
""".format(tiny=TINY, steps=STEPS, save_every=SAVE_EVERY)


def start(tmp_path, out, resume, slow_save):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               **{run_folder.SLOW_SAVE_ENV: str(slow_save)})
    log = tmp_path / "steps.log"
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), str(log),
                             "resume" if resume else "new"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def last_logged_step(tmp_path) -> int:
    lines = (tmp_path / "steps.log").read_text().split() if (tmp_path / "steps.log").exists() else []
    return int(lines[-1]) if lines else 0


def wait_until(condition, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.stderr.read().decode()}")
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.002)


def history_steps(out) -> list:
    return [h["step"] for h in run_folder.read_state(str(out))["history"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's per-step losses, from the same script."""
    tmp_path = tmp_path_factory.mktemp("reference")
    process = start(tmp_path, tmp_path / "run", resume=False, slow_save=0)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    return [h["ce"] for h in run_folder.read_state(str(tmp_path / "run"))["history"]]


def test_sigkill_at_any_point_loses_at_most_the_save_interval(tmp_path, reference):
    out, tmp, old = tmp_path / "run", tmp_path / "run.tmp", tmp_path / "run.old"
    rng = random.Random()  # new kill points every run; printed so a failure can be replayed
    seed = rng.randrange(10**6)
    rng.seed(seed)
    print("kill-point seed", seed)
    kill_points = [
        # (when to kill, where that is)
        (lambda: last_logged_step(tmp_path) >= rng.randrange(4, 12), "a random step"),
        (lambda: tmp.is_dir() and not (tmp / "train_state.json").exists(), "writing .tmp"),
        (lambda: old.is_dir(), "between the two renames"),
        (lambda: last_logged_step(tmp_path) >= rng.randrange(18, 26), "a random step"),
    ]
    resume = False
    for condition, where in kill_points:
        process = start(tmp_path, out, resume, slow_save=0.1)
        wait_until(condition, process)
        time.sleep(rng.uniform(0, 0.05))
        process.kill()  # SIGKILL: no handler runs
        process.wait()
        reached = last_logged_step(tmp_path)
        if where == "between the two renames":
            assert not out.exists()  # the kill did land in the window with no run/ folder
        assert run_folder.recover(str(out)) is not None, f"no checkpoint after a kill {where}"
        saved = run_folder.read_state(str(out))["step"]
        assert reached - saved <= SAVE_EVERY, (where, reached, saved)
        assert history_steps(out) == list(range(1, saved + 1))
        assert not tmp.exists() and not old.exists()
        resume = saved > 0
    process = start(tmp_path, out, resume=True, slow_save=0)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    state = run_folder.read_state(str(out))
    assert [h["step"] for h in state["history"]] == list(range(1, STEPS + 1))
    # the data order, weights, AdamW moments and schedule came back: the same losses
    assert [h["ce"] for h in state["history"]] == reference


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(tmp_path, reference, signal_number):
    out = tmp_path / "run"
    process = start(tmp_path, out, resume=False, slow_save=0)
    wait_until(lambda: last_logged_step(tmp_path) >= 5, process)
    process.send_signal(signal_number)
    assert process.wait(timeout=60) == 0
    reached = last_logged_step(tmp_path)
    message = f"{signal.Signals(signal_number).name}: stopped at step {reached} of {STEPS}; saved in {out}; resume with"
    assert message in process.stdout.read().decode()
    state = run_folder.read_state(str(out))
    assert state["step"] == reached  # nothing lost: the step in progress finished and was saved
    assert [h["ce"] for h in state["history"]] == reference[:reached]
