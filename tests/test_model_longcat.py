"""LongCat-Flash's shortcut-connected MoE block (minimoe.block.ShortcutDecoderLayer): the full
preset builds (meta device) with count_params' parameter count, the layer computes the ScMoE
formula, a tiny model trains, and cached decoding (two cache slots per layer) equals the
uncached one."""

import pytest
import torch

import minimoe
from minimoe.block import ShortcutDecoderLayer
from minimoe.model import Transformer
from minimoe.sizing import count_params


def tiny_longcat(**changes):
    """The longcat-flash preset at toy size: MLA with latent scales, 6 FFN + 2 identity experts."""
    values = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                  q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=6, n_zero_experts=2, num_experts_per_tok=3,
                  moe_intermediate_size=12, routed_scaling_factor=2.0)
    values.update(changes)
    return minimoe.ModelConfig.preset("longcat-flash", **values)


def test_full_preset_builds_on_meta_with_the_sized_parameter_count():
    cfg = minimoe.ModelConfig.preset("longcat-flash")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(isinstance(layer, ShortcutDecoderLayer) for layer in model.layers)
    assert len(model.layers) == 28 and len(model.layers[0].self_attn) == 2
    assert len(model.mtp) == 1 and not model.mtp[0].block.is_moe  # MLA + dense FFN
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for name, b in model.named_buffers()
             if name.endswith("e_score_correction_bias"))
    assert n == count_params(cfg)["total"]
    # the report's "560B" total (arXiv:2509.01322 abstract): 561.06e9 with the MTP module
    assert round(n / 1e9) == 561


def test_layer_computes_the_scmoe_formula():
    torch.manual_seed(0)
    cfg = tiny_longcat()
    layer = ShortcutDecoderLayer(cfg, layer_index=0).eval()
    for p in layer.parameters():  # non-trivial norms
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, cfg.hidden_size)
    positions = torch.arange(7)
    with torch.no_grad():
        out, aux = layer(x, positions)
        u = x + layer.self_attn[0](layer.input_layernorm[0](x), positions)
        h = layer.post_attention_layernorm[0](u)
        m, _ = layer.mlp(h)
        v = u + layer.mlps[0](h)
        w = v + layer.self_attn[1](layer.input_layernorm[1](v), positions)
        expected = w + layer.mlps[1](layer.post_attention_layernorm[1](w)) + m
        # the MoE must read h (after the first attention), not x or w
        m_wrong, _ = layer.mlp(layer.post_attention_layernorm[0](x))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (m - m_wrong).abs().max() > 1e-3
    assert aux["router"]["tokens_per_expert"].shape == (8,)  # 6 FFN + 2 identity experts


def test_tiny_longcat_trains():
    torch.manual_seed(0)
    cfg = tiny_longcat(num_nextn_predict_layers=1)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        optimizer.zero_grad()
        out.loss.backward()
        if not losses:  # every part of the block gets a gradient
            layer = model.layers[0]
            for part in (layer.self_attn[0].q_a_proj.weight, layer.self_attn[1].o_proj.weight,
                         layer.mlps[0].gate_proj.weight, layer.mlps[1].down_proj.weight,
                         layer.mlp.gate.weight, layer.mlp.experts.up_proj):
                assert part.grad is not None and part.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out.aux["losses"]["ce"].item())
    assert "mtp" in out.aux["losses"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_cached_greedy_decoding_equals_uncached():
    torch.manual_seed(0)
    cfg = tiny_longcat()
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    with_cache = model.generate(prompt, max_new_tokens=8, use_cache=True)
    without = model.generate(prompt, max_new_tokens=8, use_cache=False)
    assert torch.equal(with_cache, without)


def test_shortcut_block_needs_mla():
    with pytest.raises(ValueError, match="shortcut_moe"):
        Transformer(tiny_longcat(attention="mha", mla_scale_q_lora=False,
                                 mla_scale_kv_lora=False, head_dim=16))


def test_speculative_decoding_with_the_dense_mtp_module_equals_greedy():
    from minimoe.speculative import speculative_generate

    torch.manual_seed(0)
    model = Transformer(tiny_longcat(num_nextn_predict_layers=1)).eval()
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    drafted, _ = speculative_generate(model, prompt, max_new_tokens=8)
    assert torch.equal(drafted, model.generate(prompt, max_new_tokens=8))
