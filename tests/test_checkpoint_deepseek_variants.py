"""Two published variants of the DeepSeek-V3 layout: Moonlight (moonshotai/Moonlight-16B-A3B:
full-rank query, one expert group, two shared experts, routed_scaling_factor 2.446) with
logits parity against transformers DeepseekV3, and DeepSeek-V3.1's FP8 checkpoints, whose
block scales are powers of two (quantization_config.scale_fmt "ue8m0")."""

import json

import pytest
import torch
from safetensors.torch import save_file

import minimoe
from hf_weights import PARITY_ATOL, read_all, save_randomised
from test_checkpoint import _quantise_blocks
from minimoe.config import ModelConfig

transformers = pytest.importorskip("transformers")

SEQ = 20
ATOL = PARITY_ATOL  # measured <= 4.1e-6 (see hf_weights)
# Moonlight-16B-A3B's config.json (architecture keys)
MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 2.446, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_theta": 50000.0, "rope_scaling": None, "attention_bias": False,
    "torch_dtype": "bfloat16",
}


def test_from_hf_of_moonlight():
    cfg = ModelConfig.from_hf(MOONLIGHT)
    assert cfg.attention == "mla" and cfg.q_lora_rank is None  # q_proj, no query latent
    assert (cfg.n_group, cfg.topk_group, cfg.topk_method) == (1, 1, "noaux_tc")
    assert cfg.use_expert_bias and cfg.scoring_func == "sigmoid" and cfg.norm_topk_prob
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (64, 6, 2)
    assert cfg.routed_scaling_factor == 2.446 and cfg.rope_scaling is None
    assert cfg.rope_theta == 50000.0 and cfg.seq_aux_loss_alpha == 0.001
    # Moonlight-16B-A3B: "16B total, 3B activated" (model card)
    from minimoe.sizing import count_params
    counts = count_params(cfg)
    assert round(counts["total"] / 1e9) == 16 and round(counts["active"] / 1e9) == 3


def _tiny_moonlight(folder, seed):
    """Moonlight's choices at toy size: no q latent, one group, 2 shared experts, rsf 2.446."""
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=2,
        n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
        routed_scaling_factor=2.446, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    return save_randomised(transformers.DeepseekV3ForCausalLM(config), folder, seed)


def test_moonlight_shaped_checkpoint_matches_transformers(tmp_path):
    hf_model = _tiny_moonlight(tmp_path, seed=11)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.q_proj.weight" in index  # full-rank query
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index
    with pytest.warns(UserWarning, match="without MTP"):
        model = minimoe.load_pretrained(tmp_path)
    assert model.cfg.q_lora_rank is None and model.cfg.n_group == 1
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert (model(ids).logits - hf_model(ids).logits).abs().max().item() <= ATOL


# ---- DeepSeek-V3.1: FP8 with power-of-two (UE8M0) block scales ------------------------------
V31_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
             "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


@pytest.fixture(scope="module")
def v31_checkpoint(tmp_path_factory):
    """A tiny DeepSeek-V3 quantised the V3.1 way, and transformers' model holding the
    dequantised weights (fp8 value * 2^e, computed here from the stored fp8 and scales)."""
    root = tmp_path_factory.mktemp("v31")
    config = transformers.DeepseekV3Config(
        vocab_size=136, hidden_size=32, intermediate_size=200, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128, routed_scaling_factor=2.5)
    hf_model = save_randomised(transformers.DeepseekV3ForCausalLM(config), root / "bf", 13)
    tensors, dequantised = {}, {}
    for name, tensor in read_all(root / "bf").items():
        if tensor.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name \
                and not name.endswith("mlp.gate.weight"):
            qweight, scales = _quantise_blocks(tensor, power_of_two=True)
            tensors[name], tensors[name + "_scale_inv"] = qweight, scales
            dequantised[name] = qweight.float() * scales.repeat_interleave(128, 0)[
                :tensor.shape[0]].repeat_interleave(128, 1)[:, :tensor.shape[1]]
        else:
            tensors[name] = tensor
    assert any(max(t.shape) > 128 for t in tensors.values() if t.dtype == torch.float8_e4m3fn)
    folder = root / "fp8"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    hf_config = json.loads((root / "bf" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf_config, "quantization_config": V31_QUANT}))
    # transformers' model with exactly the dequantised weights
    state = hf_model.state_dict()
    with torch.no_grad():
        for name, weight in dequantised.items():
            if name in state:
                state[name].copy_(weight)
            else:  # per-expert name -> transformers' fused in-memory experts
                prefix, tail = name.split(".mlp.experts.")
                expert, proj = int(tail.split(".")[0]), tail.split(".")[1]
                experts = hf_model.get_submodule(prefix + ".mlp.experts")
                inter = weight.shape[0] if proj != "down_proj" else weight.shape[1]
                if proj == "gate_proj":
                    experts.gate_up_proj[expert, :inter].copy_(weight)
                elif proj == "up_proj":
                    experts.gate_up_proj[expert, inter:].copy_(weight)
                else:
                    experts.down_proj[expert].copy_(weight)
    return folder, hf_model, tensors, dequantised


def test_v31_ue8m0_checkpoint_matches_transformers_on_the_dequantised_weights(v31_checkpoint):
    folder, hf_model, tensors, dequantised = v31_checkpoint
    scales = [t for n, t in tensors.items() if n.endswith("_scale_inv")]
    assert all(bool((torch.frexp(s)[0] == 0.5).all()) for s in scales)  # powers of two
    with pytest.warns(UserWarning, match="without MTP"):
        model = minimoe.load_pretrained(folder)
    state = model.state_dict()
    # bit-exact: fp8 * 2^e needs no rounding
    torch.testing.assert_close(state["layers.0.mlp.up_proj.weight"],
                               dequantised["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["layers.1.mlp.experts.down_proj"][3],
                               dequantised["model.layers.1.mlp.experts.3.down_proj.weight"],
                               rtol=0, atol=0)
    ids = torch.randint(0, 136, (2, SEQ), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert (model(ids).logits - hf_model(ids).logits).abs().max().item() <= ATOL


def test_v31_scales_stored_as_e8m0_load_the_same(v31_checkpoint, tmp_path):
    folder, _, tensors, _ = v31_checkpoint
    as_e8m0 = {n: t.to(torch.float8_e8m0fnu) if n.endswith("_scale_inv") else t
               for n, t in tensors.items()}
    save_file(as_e8m0, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.warns(UserWarning, match="without MTP"):
        a = minimoe.load_pretrained(folder).state_dict()
        b = minimoe.load_pretrained(tmp_path).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_ue8m0_scales_that_are_not_powers_of_two_are_named(v31_checkpoint, tmp_path):
    folder, _, tensors, _ = v31_checkpoint
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    broken = dict(tensors)
    broken[name] = tensors[name] * 1.5
    save_file(broken, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight_scale_inv.*power of two"):
        with pytest.warns(UserWarning, match="without MTP"):
            minimoe.load_pretrained(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["scale_fmt"] = "e5m2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="scale_fmt"):
        with pytest.warns(UserWarning, match="without MTP"):
            minimoe.load_pretrained(tmp_path)
