"""load_pretrained / from_hf for LongCat-Flash: logits parity with transformers 5.23
LongcatFlashForCausalLM on tiny random checkpoints saved in the hub layout (sharded safetensors +
index, one tensor per expert), layer subsets, and the config keys that must be refused."""

import json

import pytest
import torch

import minimoe
from hf_weights import PARITY_ATOL, save_randomised
from minimoe.config import ModelConfig

transformers = pytest.importorskip("transformers")

SEQ = 24
ATOL = PARITY_ATOL  # measured <= 4.1e-6 (see hf_weights)
# 6 FFN experts + 2 identity experts, top-3; q/kv latents narrower than hidden, so the
# LongCat latent scales sqrt(C / r) are not 1
BASE = dict(vocab_size=96, hidden_size=32, num_layers=3, num_attention_heads=4,
            ffn_hidden_size=40, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, head_dim=4, v_head_dim=8, moe_topk=3, n_routed_experts=6,
            zero_expert_num=2, expert_ffn_hidden_size=12, max_position_embeddings=128)
CASES = {
    # plain RoPE, routed_scaling_factor on every gate (identity experts included)
    "rope-default": dict(routed_scaling_factor=3.0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e7}),
    # bias on q_a/kv_a/o_proj; DeepSeek-style YaRN (softmax scale * mscale(all_dim)^2)
    "bias-yarn": dict(routed_scaling_factor=6.0, attention_bias=True,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16, "beta_fast": 32,
                                       "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}),
}


def _save_hf(case, folder, seed):
    config = transformers.LongcatFlashConfig(**{**BASE, **CASES[case]})
    return save_randomised(transformers.LongcatFlashForCausalLM(config), folder, seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("longcat")
    return folder, _save_hf("rope-default", folder, seed=0)


def test_saved_checkpoint_layout(checkpoint):
    folder, _ = checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2  # several shards
    layer = "model.layers.2."
    for name in ("self_attn.0.q_b_proj.weight", "self_attn.1.kv_a_proj_with_mqa.weight",
                 "mlps.0.gate_proj.weight", "mlps.1.down_proj.weight",
                 "input_layernorm.1.weight", "post_attention_layernorm.0.weight",
                 "mlp.router.classifier.weight", "mlp.router.e_score_correction_bias"):
        assert layer + name in index, name
    # one tensor per FFN expert, nothing fused
    for expert in range(6):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{layer}mlp.experts.{expert}.{proj}.weight" in index
    assert not any("gate_up_proj" in name for name in index)
    # transformers' fused gate_up_proj has rows for the identity experts too: its save writes
    # gate/up (never used) for experts 6 and 7, but no down_proj (that one is sized E)
    assert f"{layer}mlp.experts.7.up_proj.weight" in index
    assert f"{layer}mlp.experts.7.down_proj.weight" not in index
    config = json.loads((folder / "config.json").read_text())
    assert config["num_layers"] == 3 and "num_hidden_layers" not in config


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, checkpoint, tmp_path):
    if case == "rope-default":
        folder, hf_model = checkpoint
    else:
        folder, hf_model = tmp_path, _save_hf(case, tmp_path, seed=2)
    model = minimoe.load_pretrained(folder)
    cfg = model.cfg
    assert cfg.shortcut_moe and cfg.num_hidden_layers == 3 and cfg.n_zero_experts == 2
    assert (cfg.scoring_func, cfg.norm_topk_prob, cfg.use_expert_bias) == ("softmax", False, True)
    assert cfg.mla_scale_q_lora and cfg.mla_scale_kv_lora
    bias = model.layers[-1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0

    ids = torch.randint(0, BASE["vocab_size"], (2, SEQ),
                        generator=torch.Generator().manual_seed(100 + len(case)))
    with torch.no_grad():
        expected = hf_model(ids).logits
        out = model(ids)
    assert out.logits.dtype == torch.float32
    assert (out.logits - expected).abs().max().item() <= ATOL
    # the identity experts were really chosen, so their weight * x path was compared too
    picked = sum(stats["tokens_per_expert"][6:].sum().item() for stats in out.aux["router"].values())
    assert picked > 0


def test_layer_subset_matches_transformers_with_the_same_layers(checkpoint):
    folder, hf_model = checkpoint
    model = minimoe.load_pretrained(folder, layers=[0, 2])
    assert model.cfg.num_hidden_layers == 2
    layers = hf_model.model.layers
    hf_model.model.layers = torch.nn.ModuleList([layers[0], layers[2]])
    hf_model.config.num_layers = 2
    try:
        ids = torch.randint(0, BASE["vocab_size"], (1, SEQ),
                            generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            diff = (model(ids).logits - hf_model(ids, use_cache=False).logits).abs().max().item()
    finally:
        hf_model.model.layers, hf_model.config.num_layers = layers, 3
    assert diff <= ATOL


def test_from_hf_of_the_published_config_matches_the_preset():
    # LongCat-Flash-Chat's config.json (the architecture keys)
    published = {"model_type": "longcat_flash", "architectures": ["LongcatFlashForCausalLM"],
                 "vocab_size": 131072, "hidden_size": 6144, "num_layers": 28,
                 "num_attention_heads": 64, "ffn_hidden_size": 12288,
                 "expert_ffn_hidden_size": 2048, "n_routed_experts": 512, "zero_expert_num": 256,
                 "zero_expert_type": "identity", "moe_topk": 12, "routed_scaling_factor": 6.0,
                 "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                 "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000000.0,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                 "mla_scale_q_lora": True, "mla_scale_kv_lora": True, "router_bias": False,
                 "hidden_act": "silu", "attention_bias": False}
    got = ModelConfig.from_hf(published).to_dict()
    preset = ModelConfig.preset("longcat-flash").to_dict()
    differ = {k for k in got if got[k] != preset[k]}
    # config.json does not count the MTP module: load_pretrained builds it when the checkpoint
    # holds model.mtp.* (tests/test_checkpoint_longcat_mtp.py); the preset has it
    assert differ == {"name", "num_nextn_predict_layers"}, differ


@pytest.mark.parametrize("changes,key", [
    (dict(router_bias=True), "router_bias"),
    (dict(zero_expert_type="zero"), "zero_expert_type"),
    (dict(head_dim=8), "head_dim"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_from_hf_refuses_keys_that_change_the_function(changes, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf({**BASE, "model_type": "longcat_flash", **changes})
