"""LoRA / QLoRA: adapters, quantised frozen bases, merge, save/load, the finetune command."""

import json
import math

import pytest
import torch
import torch.nn as nn

from minimoe import cli, lora
from minimoe.config import ModelConfig
from minimoe.model import Transformer
from minimoe.moe import grouped_mm_backend
from minimoe.train import load_checkpoint

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_group=2, topk_group=1)


def tiny_model(preset="toy", seed=0, **changes):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset, **{**TINY, **changes}))


def batch(seed=1, B=2, T=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T + 1), generator=generator)


def train_steps(model, ids, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---- quantisation -------------------------------------------------------------------------------
def test_nf4_code_book_is_the_normal_quantile_construction():
    # QLoRA §3 / Appendix E: Phi^-1 at 9 (positive) and 8 (negative) equal steps from
    # delta = 1 - (1/32 + 1/30)/2 to 0.5, one exact zero, each side normalised to +-1.
    delta = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    code = code / code.max()
    assert lora.NF4_CODE.shape == (16,)
    torch.testing.assert_close(lora.NF4_CODE.double(), code, atol=2e-6, rtol=0)


def test_pack_4bit_layout_and_round_trip():
    assert lora.pack_4bit(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    values = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    packed = lora.pack_4bit(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert torch.equal(lora.unpack_4bit(packed), values)
    with pytest.raises(ValueError, match="even"):
        lora.pack_4bit(torch.zeros(3, dtype=torch.uint8))


def test_int8_error_is_at_most_half_a_step_per_row():
    weight = torch.randn(37, 53)
    weight[3, 7] = 40.0  # an outlier: only its own row's scale grows
    weight[5] = 0.0  # an all-zero row stays exactly zero
    q, scale = lora.quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    step = weight.abs().max(dim=1).values / 127  # (37,) computed here, not taken from scale
    error = (lora.dequantize_int8(q, scale) - weight).abs()  # (37, 53)
    assert (error <= step[:, None] / 2 + 1e-6).all()
    assert torch.equal(lora.dequantize_int8(q, scale)[5], torch.zeros(53))
    assert error[3].max() > error[4].max()  # the outlier row is coarser


@pytest.mark.parametrize("shape", [(64, 128), (7, 45), (3, 5, 11)])
def test_nf4_is_nearest_code_value_times_block_absmax(shape):
    weight = torch.randn(shape)
    packed, absmax = lora.quantize_nf4(weight)
    n = weight.numel()
    blocks = math.ceil(n / 64)
    assert packed.dtype == torch.uint8 and packed.numel() == blocks * 32
    assert absmax.numel() == blocks
    restored = lora.dequantize_nf4(packed, absmax, shape)
    # brute force: each element's block absmax, then the closest of the 16 code values
    flat = torch.nn.functional.pad(weight.reshape(-1), (0, blocks * 64 - n)).view(blocks, 64)
    block_max = flat.abs().max(dim=1, keepdim=True).values  # (blocks, 1)
    normalized = (flat / block_max).reshape(-1, 1)  # (blocks*64, 1)
    nearest = lora.NF4_CODE[(normalized - lora.NF4_CODE).abs().argmin(dim=1)]
    expected = (nearest.view(blocks, 64) * block_max).reshape(-1)[:n].view(shape)
    torch.testing.assert_close(restored, expected, atol=1e-6, rtol=1e-6)
    half_gap = (lora.NF4_CODE[1:] - lora.NF4_CODE[:-1]).max() / 2  # 0.1519 (-1.0 -> -0.6962)
    assert abs(half_gap.item() - (1.0 - 0.6961928009986877) / 2) < 1e-7
    bound = (block_max * half_gap).expand(blocks, 64).reshape(-1)[:n].view(shape)
    assert ((restored - weight).abs() <= bound + 1e-6).all()


def test_quantized_linear_forward_within_the_quantisation_bound():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(5, 96)
    exact = linear(x)  # (5, 40)
    # int8: |dy_o| <= (s_o / 2) * sum_i |x_i|
    int8 = lora.QuantizedLinear(linear, "int8")
    step = linear.weight.abs().max(dim=1).values / 127  # (40,)
    bound = x.abs().sum(dim=1, keepdim=True) * step / 2  # (5, 40)
    assert ((int8(x) - exact).abs() <= bound + 1e-5).all()
    # nf4: |dy_o| <= sum_i |x_i| * half_gap * absmax(block of W_oi)
    nf4 = lora.QuantizedLinear(linear, "nf4")
    block_max = linear.weight.detach().reshape(-1, 64).abs().max(dim=1).values  # 96*40/64 blocks
    half_gap = (lora.NF4_CODE[1:] - lora.NF4_CODE[:-1]).max() / 2
    element_bound = (block_max[:, None] * half_gap).expand(-1, 64).reshape(40, 96)  # (40, 96)
    bound = x.abs() @ element_bound.T  # (5, 40)
    assert ((nf4(x) - exact).abs() <= bound + 1e-5).all()
    assert (nf4(x) - exact).abs().max() > (int8(x) - exact).abs().max()


def test_quantized_base_memory():
    model = tiny_model()
    float_bytes = lora.weight_bytes(model)["total"]
    sizes = {}
    for kind in ("int8", "nf4"):
        quantized = lora.add_lora(tiny_model(), quantize_base=kind)
        expected = 0  # computed from the float model's decoder weights, not from the buffers
        for name, p in model.named_parameters():
            quantizable = (name.startswith(("layers.", "mtp.")) and p.dim() >= 2
                           and ".gate.weight" not in name)
            if not quantizable:
                continue
            if kind == "int8":
                expected += p.numel() + 4 * math.prod(p.shape[:-1])  # 1 byte + a scale per row
            else:
                blocks = math.ceil(p.numel() / 64)
                expected += 32 * blocks + 4 * blocks  # 64 codes in 32 bytes + one absmax
        sizes[kind] = lora.weight_bytes(quantized)
        assert sizes[kind]["quantized"] == expected
    assert sizes["nf4"]["total"] < sizes["int8"]["total"] < float_bytes


def test_quantized_routed_experts_keep_the_dispatch_working():
    experts = tiny_model().layers[1].mlp.experts
    for kind, tolerance in (("int8", 0.02), ("nf4", 0.2)):
        quantized = lora.QuantizedRoutedExperts(experts, kind)
        assert isinstance(quantized, type(experts)) and not list(quantized.parameters())
        assert quantized.gate_proj.shape == experts.gate_proj.shape
        relative = (quantized.down_proj - experts.down_proj).norm() / experts.down_proj.norm()
        assert relative < tolerance


# ---- the adapters -------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["toy", "toy-gqa"])
def test_zero_init_leaves_logits_unchanged(preset):
    model = tiny_model(preset).eval()
    ids = batch()[:, :-1]
    before = model(ids).logits
    lora.add_lora(model, rank=4, alpha=8)
    assert torch.equal(model(ids).logits, before)
    wrapped = lora.lora_modules(model)
    assert wrapped and all(torch.equal(m.lora_B, torch.zeros_like(m.lora_B))
                           for m in wrapped.values())
    assert all(lora.target_group(name) in lora.DEFAULT_TARGETS for name in wrapped)


def test_only_adapters_train_and_the_base_stays_bit_identical():
    model = tiny_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=4)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    train_steps(model, batch(), steps=3)
    merged_names = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
                    if not k.endswith(("lora_A", "lora_B"))}
    assert set(merged_names) == set(base_state)
    for name, tensor in base_state.items():
        assert torch.equal(merged_names[name], tensor), name
    assert any(m.lora_B.abs().sum() > 0 for m in lora.lora_modules(model).values())


def test_loss_falls_on_a_memorisation_task():
    # With the default init (std 0.02) the frozen output head is too small for confident
    # predictions (|logits| < ~1 whatever the hidden state); std 0.2 stands in for a trained
    # head, so what the adapters learn shows in the loss.
    model = tiny_model(initializer_range=0.2)
    lora.add_lora(model, rank=8, alpha=16)
    ids = batch(seed=3, B=2, T=24)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    ce = []
    for _ in range(20):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ce.append(out.aux["losses"]["ce"].item())
    assert ce[-1] < ce[0] - 2.0, ce  # measured: 5.99 -> 2.43 nats


@pytest.mark.parametrize("quantize_base", [None, "int8", "nf4"])
def test_merge_gives_the_same_logits(quantize_base):
    model = tiny_model()
    keys = set(model.state_dict())
    lora.add_lora(model, rank=4, quantize_base=quantize_base)
    ids = batch()
    train_steps(model, ids, steps=2)
    model.eval()
    before = model(ids[:, :-1]).logits
    lora.merge_lora(model)
    assert not lora.lora_modules(model)
    assert all(type(m) is not lora.QuantizedLinear for m in model.modules())
    assert set(model.state_dict()) == keys  # an ordinary Transformer again
    torch.testing.assert_close(model(ids[:, :-1]).logits, before, atol=1e-5, rtol=1e-5)


def test_mla_absorbed_mode_sees_the_adapted_kv_b_proj():
    model = tiny_model()
    lora.add_lora(model, rank=4, quantize_base="int8")
    ids = batch()
    train_steps(model, ids, steps=2)
    model.eval()
    latent = model(ids[:, :-1]).logits
    for layer in model.layers:
        layer.self_attn.mla_mode = "absorbed"
    torch.testing.assert_close(model(ids[:, :-1]).logits, latent, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    grouped_mm_backend("cpu", torch.float32)  # probe once, outside any checkpointed forward
    ids = batch()
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_model()
        lora.add_lora(model, rank=4, quantize_base="nf4")
        for module in lora.lora_modules(model).values():  # non-zero B: every path is live
            nn.init.normal_(module.lora_B, std=0.02, generator=torch.Generator().manual_seed(0))
        model.gradient_checkpointing = use_checkpoint
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    lora.add_lora(model, rank=4, alpha=4, targets=("attention", "dense_mlp"))
    ids = batch()
    train_steps(model, ids, steps=2)
    lora.save_lora(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank"] == 4 and config["targets"] == ["attention", "dense_mlp"]

    restored = lora.load_lora(tiny_model(), tmp_path / "adapter")  # adds the adapters itself
    saved, loaded = lora.lora_state_dict(model), lora.lora_state_dict(restored)
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    model.eval(), restored.eval()
    assert torch.equal(restored(ids[:, :-1]).logits, model(ids[:, :-1]).logits)

    other = lora.add_lora(tiny_model(), rank=2, targets=("attention", "dense_mlp"))
    with pytest.raises(ValueError, match="rank=4.*has rank=2"):
        lora.load_lora(other, tmp_path / "adapter")
    # same shapes, another alpha: the adapters would be scaled by alpha / rank = 2, not 1
    other = lora.add_lora(tiny_model(), rank=4, alpha=8, targets=("attention", "dense_mlp"))
    with pytest.raises(ValueError, match="alpha=4.*has alpha=8"):
        lora.load_lora(other, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_lora(tiny_model(), tmp_path / "nowhere")


def test_bad_requests_are_refused_clearly():
    with pytest.raises(ValueError, match="'experts_everywhere'"):
        lora.add_lora(tiny_model(), targets=("experts_everywhere",))
    with pytest.raises(ValueError, match="quantize_base"):
        lora.add_lora(tiny_model(), quantize_base="fp3")
    model = lora.add_lora(tiny_model())
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model)


# ---- counting -------------------------------------------------------------------------------
LONGCAT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                    n_routed_experts=8, n_zero_experts=2, num_experts_per_tok=2, q_lora_rank=16,
                    kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                    vocab_size=256, num_nextn_predict_layers=1)


DENSE_TINY = {k: v for k, v in TINY.items()
              if k not in ("n_routed_experts", "n_group", "topk_group")}


@pytest.mark.parametrize("preset, changes", [("toy", TINY), ("toy-gqa", TINY),
                                             ("toy-dense", DENSE_TINY),
                                             ("longcat-flash", LONGCAT_TINY)])
def test_parameter_count_from_the_config_matches_a_built_model(preset, changes):
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, **changes)
    model = Transformer(cfg)
    built = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
             if type(m) is nn.Linear}
    assert lora.linear_shapes(cfg) == built
    targets = ("attention", "shared_experts", "dense_mlp")
    lora.add_lora(model, rank=3, targets=targets)
    count = lora.lora_parameter_count(cfg, rank=3, targets=targets)
    assert count["trainable"] == sum(p.numel() for p in lora.trainable_parameters(model))
    # minimoe.sizing counts the router's selection bias (a buffer) with the parameters
    selection_bias = sum(b.numel() for n, b in model.named_buffers() if "e_score_correction" in n)
    assert count["total"] == sum(p.numel() for p in model.parameters()) + selection_bias


def test_deepseek_v3_trainable_fraction():
    # rank 8 on MLA + shared expert, written out from the published shapes (C = 7168,
    # 128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128; shared expert width 2048):
    r = 8
    attention = r * ((7168 + 1536) + (1536 + 128 * 192) + (7168 + 512 + 64)
                     + (512 + 128 * 256) + (128 * 128 + 7168))
    shared = r * 3 * (7168 + 2048)
    layers, moe_layers = 61 + 1, 58 + 1  # 61 layers (3 dense) + the MTP block (MoE)
    count = lora.lora_parameter_count(ModelConfig.preset("deepseek-v3"), rank=8)
    assert count["trainable"] == layers * attention + moe_layers * shared  # 62.3M
    assert 8e-5 < count["fraction"] < 1e-4  # ~0.009% of ~683B


# ---- the command ----------------------------------------------------------------------------
def test_cli_finetune_end_to_end(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("lora adapts attention and shared experts. " * 100, encoding="utf-8")
    out = tmp_path / "run"
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    code = cli.main(["finetune", "toy", "--data", str(text), "--lora-rank", "4", "--steps", "3",
                     "--batch-size", "2", "--seq-len", "16", "--eval-every", "3", "--out",
                     str(out), "--quantize-base", "nf4", "--grad-checkpointing", "--merge",
                     *overrides])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "trainable parameters" in printed and "fine-tuned toy for 3 steps" in printed
    assert (out / "adapter_model.safetensors").exists()
    merged = load_checkpoint(str(out / "merged")).eval()

    # the same base (preset + seed), the saved adapters, merged here: the same model
    base = lora.load_base_model("toy", TINY, seed=0)
    lora.load_lora(base, out, quantize_base="nf4")
    lora.merge_lora(base.eval())
    ids = batch()[:, :-1]
    torch.testing.assert_close(merged(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)

    # the merged folder is a `minimoe train` checkpoint: it can be fine-tuned again
    again = tmp_path / "again"
    assert cli.main(["finetune", str(out / "merged"), "--data", str(text), "--steps", "1",
                     "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                     "--targets", "o_proj", "--out", str(again)]) == 0
    assert json.loads((again / "adapter_config.json").read_text())["targets"] == ["o_proj"]
    # a checkpoint's fields come from its config.json: --set would silently not apply
    with pytest.raises(ValueError, match=r"\['hidden_size'\] change a preset's fields"):
        lora.load_base_model(str(out / "merged"), {"hidden_size": 64})

    assert cli.main(["finetune", "toy", "--data", str(tmp_path / "missing.txt"),
                     "--out", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err
