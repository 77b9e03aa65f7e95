"""torchrun -m minimoe.parallel.train gives the single-process losses, weights and optimiser
state, and writes a checkpoint that minimoe.train.load_checkpoint reads."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
import torch

from minimoe.train import TrainArgs, load_checkpoint, train

STEPS, BATCH, SEQ, CORPUS = 3, 4, 32, 20_000


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("single") / "run")
    args = TrainArgs(steps=STEPS, batch_size=BATCH, seq_len=SEQ, corpus_tokens=CORPUS,
                     eval_every=0, out_dir=out_dir, progress=False)
    model, history, _ = train(args)
    return out_dir, model, history


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, relative: float, name: str):
    """|got - want| <= relative * max|want| elementwise (float round-off, not a bug)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert diff <= relative * scale + 1e-30, (name, diff, scale)


def run_torchrun(nproc: int, out_dir: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
               "--nproc-per-node", str(nproc), "-m", "minimoe.parallel.train", "--steps", str(STEPS),
               "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--corpus-tokens", str(CORPUS),
               "--out", out_dir, "--log-every", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("nproc", [2, 4])
def test_parallel_training_equals_single_process(nproc, single_process_run, tmp_path):
    single_dir, model, history = single_process_run
    out_dir = str(tmp_path / "run")
    stdout = run_torchrun(nproc, out_dir)
    assert f"expert parallelism over {nproc} processes" in stdout

    with open(os.path.join(out_dir, "train_state.json")) as handle:
        parallel_history = json.load(handle)["history"]
    assert len(parallel_history) == STEPS
    for ours, theirs in zip(parallel_history, history):
        for key in ("loss", "ce", "seq_aux", "mtp", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=2e-5, abs=1e-7), (key, ours, theirs)
    assert history[-1]["loss"] < history[0]["loss"]  # it trains

    gathered = load_checkpoint(out_dir)  # the ordinary run folder, single-process layout
    reference = model.state_dict()
    assert set(gathered.state_dict()) == set(reference)
    for name, tensor in gathered.state_dict().items():
        # Adam moves every weight by ~lr whatever its gradient's size, so elements whose
        # gradient is round-off move by round-off-driven amounts: up to ~4e-6 seen (weights ~0.1),
        # against ~6e-4 moved in 3 steps; a wrong gradient shows in the moments and the losses
        assert_close_scaled(tensor, reference[name], 2e-4, name)

    # the gathered optimiser state is the single-process one: every moment of every tensor
    # (train_state.safetensors: "optimizer.<parameter name>.<key>"; param groups in the json)
    ours = load_file(os.path.join(out_dir, "train_state.safetensors"))
    theirs = load_file(os.path.join(single_dir, "train_state.safetensors"))
    ours_json = json.loads(open(os.path.join(out_dir, "train_state.json")).read())
    theirs_json = json.loads(open(os.path.join(single_dir, "train_state.json")).read())
    assert ours_json["optimizer_param_groups"] == theirs_json["optimizer_param_groups"]
    moments = sorted(k for k in theirs if k.startswith("optimizer.")
                     and k.endswith((".exp_avg", ".exp_avg_sq")))
    assert moments and sorted(k for k in ours if k.startswith("optimizer.")
                              and k.endswith((".exp_avg", ".exp_avg_sq"))) == moments
    for key in moments:
        assert_close_scaled(ours[key], theirs[key], 1e-4, key)
