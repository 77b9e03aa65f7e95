"""MTP objective: the loss-weight schedule and the offsets of each depth (D = 2)."""

import pytest
import torch

import minimoe
from minimoe.model import Transformer
from minimoe.train import TrainArgs, mtp_loss_weight, train

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_group=2, topk_group=1,
            max_position_embeddings=64)


def test_mtp_loss_weight_schedule_formula():
    args = TrainArgs(mtp_weight_switch_step=10, mtp_loss_weight_after=0.1)
    assert mtp_loss_weight(0, args, 0.3) == 0.3
    assert mtp_loss_weight(9, args, 0.3) == 0.3
    assert mtp_loss_weight(10, args, 0.3) == 0.1
    assert mtp_loss_weight(500, TrainArgs(), 0.3) == 0.3  # no switch step: constant


def test_training_switches_the_mtp_weight(tmp_path):
    args = TrainArgs(preset="toy", config_overrides=dict(TINY, num_nextn_predict_layers=2),
                     corpus_tokens=20_000, out_dir=str(tmp_path / "run"), steps=4, batch_size=2,
                     seq_len=16, eval_every=0, progress=False, save=False,
                     mtp_weight_switch_step=2, mtp_loss_weight_after=0.1)
    model, history, _ = train(args)
    assert [h["mtp_loss_weight"] for h in history] == [0.3, 0.3, 0.1, 0.1]
    # the model's loss uses the scheduled weight: mtp = (lambda / D) * (CE_1 + CE_2)
    last = history[-1]
    assert last["mtp"] == pytest.approx(0.1 / 2 * (last["mtp_ce_1"] + last["mtp_ce_2"]), rel=1e-5)


def test_mtp_depth_k_reads_hidden_k_minus_1_and_embedding_of_t_i_plus_k():
    """Depth k at position i predicts t_{i+k+1} from tokens t_0..t_{i+k} and nothing later.

    The loss of one position is isolated by setting every other label to -100; then a token
    changes that loss exactly when it lies at or before i + k (the token whose embedding
    depth k reads at position i).
    """
    cfg = minimoe.ModelConfig.preset("toy", **TINY, num_nextn_predict_layers=2)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    T, i = 10, 4
    ids = torch.randint(0, cfg.vocab_size, (1, T + 1))
    inputs, full_targets = ids[:, :-1], ids[:, 1:]

    def depth_loss(k, tokens):
        targets = torch.full_like(full_targets, -100)
        # depth k's label at position i is targets[:, i + k] = t_{i+k+1}
        targets[:, i + k] = full_targets[:, i + k]
        with torch.no_grad():
            return model(tokens, targets=targets).aux["losses"][f"mtp_ce_{k}"]

    for k in (1, 2):
        base = depth_loss(k, inputs)
        for j in range(T):
            changed = inputs.clone()
            changed[0, j] = (changed[0, j] + 1) % cfg.vocab_size
            moved = not torch.allclose(depth_loss(k, changed), base, rtol=0, atol=1e-7)
            assert moved == (j <= i + k), (k, j)


def randomise(model, seed):
    """Weights of unit-scale outputs and norm gains away from one. With all gains one,
    hnorm(norm(x)) = hnorm(x) (RMSNorm is scale-invariant) and the two MTP inputs could not
    be told apart; with the default small init the logits are all near zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if "norm" in name else noise / param.shape[-1] ** 0.5)


def manual_mtp_logits(model, inputs, post_norm):
    """h^1 = M_1(h^0, Emb(t_{i+1})), h^2 = M_2(h^1, Emb(t_{i+2})), embedding-first concat;
    post_norm: h^0 = norm(x) (the main model's final norm) and h^1 = final_norm_1(block out)."""
    T = inputs.shape[1]
    positions = torch.arange(T)
    x = model(inputs).hidden  # (B, T, C) residual stream after the last main block
    h = model.norm(x) if post_norm else x
    logits = []
    for k, module in enumerate(model.mtp, start=1):
        emb = model.embed_tokens(inputs[:, k:])  # Emb(t_{i+k})
        combined = torch.cat([module.enorm(emb), module.hnorm(h[:, :T - k])], dim=-1)
        out, _ = module.block(module.eh_proj(combined), positions[:T - k], None)
        logits.append(model.lm_head(module.final_norm(out)))  # predicts t_{i+k+1}
        h = module.final_norm(out) if post_norm else out
    return logits


@pytest.mark.parametrize("mtp_input", ["post_norm", "pre_norm"])
def test_mtp_depth_2_matches_manual_chain(mtp_input):
    cfg = minimoe.ModelConfig.preset("toy", **TINY, num_nextn_predict_layers=2,
                                     mtp_input=mtp_input)
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    randomise(model, seed=2)
    T, V = 9, cfg.vocab_size
    ids = torch.randint(0, V, (2, T + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        out = model(inputs, targets=targets)
        drafts = minimoe.mtp.mtp_logits(model, inputs)
        expected = manual_mtp_logits(model, inputs, post_norm=mtp_input == "post_norm")
        other = manual_mtp_logits(model, inputs, post_norm=mtp_input != "post_norm")
    for k in (1, 2):
        torch.testing.assert_close(drafts[k - 1], expected[k - 1], rtol=0, atol=1e-5)
        ce = torch.nn.functional.cross_entropy(expected[k - 1].reshape(-1, V),
                                               targets[:, k:].reshape(-1))
        torch.testing.assert_close(out.aux["losses"][f"mtp_ce_{k}"], ce)
        # the other input is another function of the same weights: far beyond rounding
        assert (drafts[k - 1] - other[k - 1]).abs().max() > 0.1
    assert set(out.aux["router"]) >= {"mtp.0", "mtp.1"}
