"""Training loop, checkpoints and the command line, on a tiny model and a tiny corpus."""

import json
import math
import os

import pytest
import torch

from minimoe import cli
from minimoe.train import TrainArgs, learning_rate, load_checkpoint, train

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_group=2, topk_group=1)


def tiny_args(tmp_path, **changes):
    values = dict(preset="toy", config_overrides=dict(TINY), corpus_tokens=40_000,
                  out_dir=str(tmp_path / "run"), steps=30, batch_size=8, seq_len=32,
                  lr=3e-3, warmup_steps=5, eval_every=15, eval_batches=2, progress=False)
    values.update(changes)
    return TrainArgs(**values)


def test_learning_rate_schedule_formula():
    args = TrainArgs(steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert learning_rate(0, args) == pytest.approx(0.1)  # (0 + 1) / 10 of the peak
    assert learning_rate(9, args) == pytest.approx(1.0)
    # halfway through the cosine phase: min + (max - min) / 2
    assert learning_rate(60, args) == pytest.approx(0.55)
    assert learning_rate(110, args) == pytest.approx(0.1)


def test_make_optimizer_is_fused_adamw_with_decay_on_matrices_only():
    """Two steps of make_optimizer's (fused) AdamW against the AdamW formula (Loshchilov &
    Hutter, Algorithm 2, as torch.optim.AdamW writes it) on a matrix and a vector."""
    from minimoe.train import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.matrix = torch.nn.Parameter(torch.randn(3, 4))
    model.vector = torch.nn.Parameter(torch.randn(4))
    args = TrainArgs(lr=0.1, weight_decay=0.5)
    optimizer = make_optimizer(model, args)
    assert all(group["fused"] for group in optimizer.param_groups)  # on the CPU
    beta1, beta2, eps = 0.9, 0.95, 1e-8
    expected = {"matrix": model.matrix.detach().clone(), "vector": model.vector.detach().clone()}
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in expected.items()}
    for step in (1, 2):
        grads = {"matrix": torch.randn(3, 4), "vector": torch.randn(4)}
        model.matrix.grad, model.vector.grad = grads["matrix"].clone(), grads["vector"].clone()
        optimizer.step()
        for name, decay in (("matrix", 0.5), ("vector", 0.0)):  # decay on dim >= 2 only
            m, v = moments[name]
            m.mul_(beta1).add_((1 - beta1) * grads[name])
            v.mul_(beta2).add_((1 - beta2) * grads[name] ** 2)
            m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
            expected[name] = (expected[name] * (1 - args.lr * decay)
                              - args.lr * m_hat / (v_hat.sqrt() + eps))
    torch.testing.assert_close(model.matrix.detach(), expected["matrix"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.vector.detach(), expected["vector"], rtol=1e-5, atol=1e-6)


def test_training_reduces_loss_and_checkpoint_round_trips(tmp_path):
    args = tiny_args(tmp_path)
    model, history, (_, val) = train(args)
    assert len(history) == 30
    first, last = history[0]["ce"], history[-1]["ce"]
    assert first > math.log(256) - 0.3  # starts near uniform over bytes
    assert last < first - 1.0  # and learns something in 30 steps
    assert "val_loss" in history[-1] and "mtp_ce_1" in history[-1]
    assert {"max_vio", "max_vio_by_layer", "tokens_per_second"} <= set(history[-1])
    # the checkpoint folder is complete and reloads to the same function
    assert sorted(os.listdir(args.out_dir)) == ["byte_tokenizer.json", "config.json",
                                                "model.safetensors", "train_state.json",
                                                "train_state.safetensors"]  # no pickle
    assert not os.path.exists(args.out_dir + ".tmp") and not os.path.exists(args.out_dir + ".old")
    with open(os.path.join(args.out_dir, "train_state.json")) as handle:
        state = json.load(handle)
    assert state["step"] == 30 and [h["step"] for h in state["history"]] == list(range(1, 31))
    reloaded = load_checkpoint(args.out_dir)
    ids = torch.randint(0, 256, (2, 16))
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    # the expert-bias buffers travel with the weights
    for (name, a), (_, b) in zip(model.named_buffers(), reloaded.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(a, b) and a.abs().sum() > 0


def test_resume_continues_from_saved_step(tmp_path):
    train(tiny_args(tmp_path, steps=10, eval_every=0))
    _, history, _ = train(tiny_args(tmp_path, steps=14, eval_every=0, resume=True))
    assert [h["step"] for h in history] == list(range(1, 15))
    with open(os.path.join(tmp_path, "run", "train_state.json")) as handle:
        assert json.load(handle)["step"] == 14


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_exactly_where_it_stopped(tmp_path):
    """Weights, AdamW moments, the data generator and the schedule all come back: the resumed
    run's losses are the uninterrupted run's, bit for bit."""
    _, reference, _ = train(tiny_args(tmp_path, out_dir=str(tmp_path / "reference"), steps=14,
                                      eval_every=7))

    def crash_at_step_8(record):
        if record["step"] == 8:
            raise Interrupt

    with pytest.raises(Interrupt):  # saved at steps 3 and 6 (save_every), then "crashed"
        train(tiny_args(tmp_path, steps=14, eval_every=7, save_every=3), on_step=crash_at_step_8)
    with open(tmp_path / "run" / "train_state.json") as handle:
        assert json.load(handle)["step"] == 6
    _, resumed, _ = train(tiny_args(tmp_path, steps=14, eval_every=7, resume=True))
    assert [h["step"] for h in resumed] == list(range(1, 15))
    assert [h["ce"] for h in resumed] == [h["ce"] for h in reference]
    assert resumed[-1]["val_loss"] == reference[-1]["val_loss"]


def test_bf16_and_grad_accumulation_and_checkpointing_run(tmp_path):
    _, history, _ = train(tiny_args(tmp_path, steps=4, dtype="bf16", grad_accum=2,
                                     grad_checkpointing=True, eval_every=0, save=False))
    assert all(math.isfinite(h["loss"]) for h in history)


def test_train_on_text_file(tmp_path):
    text_file = tmp_path / "poem.txt"
    text_file.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    _, history, (train_corpus, _) = train(tiny_args(tmp_path, data=str(text_file), steps=3,
                                                    eval_every=0, save=False))
    assert train_corpus.domain_names == ("poem",)
    assert len(history) == 3


def test_cli_train_end_to_end(tmp_path, capsys):
    code = cli.main(["train", "--steps", "3", "--batch-size", "4", "--seq-len", "32",
                     "--out", str(tmp_path / "cli_run"), "--no-progress", "--eval-every", "3"]
                    + [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Expert usage by domain" in out and "| arabic |" in out
    assert "samples" in out
    figure = tmp_path / "cli_run" / "routing_by_domain.png"  # the run's own figure
    assert figure.exists() and figure.stat().st_size > 1000
    assert f"minimoe chat {tmp_path / 'cli_run'}" in out


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert cli.main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert cli.main(["train", "--set", "num_experts_per_tok=99", "--out", str(tmp_path / "x")]) == 2
    assert "num_experts_per_tok" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(tmp_path / "missing.txt"),
                     "--out", str(tmp_path / "x")]) == 2
    assert "missing.txt" in capsys.readouterr().err


@pytest.mark.parametrize("dispatch", ["naive", "sorted"])
def test_bf16_autocast_keeps_router_in_float32(dispatch):
    from minimoe.config import ModelConfig
    from minimoe.model import Transformer

    cfg = ModelConfig.preset("toy", dispatch=dispatch, **TINY)
    model = Transformer(cfg).train()
    captured = {}
    gate = model.layers[1].mlp.gate
    gate.register_forward_hook(lambda module, args, out: captured.update(logits=out.logits))
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, targets=ids).loss
    loss.backward()
    assert captured["logits"].dtype == torch.float32
    assert torch.isfinite(loss)
