"""load_pretrained / from_hf for the GQA families: logits parity with transformers on tiny random
Qwen3-MoE, Mixtral, OLMoE and GLM-4.5 (glm4_moe) checkpoints saved in the hub layout (sharded
safetensors + index, one tensor per expert), and the config keys that must be refused."""

import json

import pytest
import torch

import minimoe
from hf_weights import PARITY_ATOL, deepseek_mtp_tensors, read_all, save_randomised
from minimoe.config import ModelConfig

transformers = pytest.importorskip("transformers")

SEQ = 24
ATOL = PARITY_ATOL  # measured <= 4.1e-6 (see hf_weights)
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# family -> (config class, model class, {case: overrides}); every case has GQA (2 KV heads for
# 4 query heads) and head_dim * heads != hidden_size where the family allows a head_dim
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        # per-head QK-norm, renormalised softmax top-3, first layer dense via mlp_only_layers
        "renorm-dense0": dict(head_dim=12, num_experts=8, num_experts_per_tok=3,
                              moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0],
                              rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        # no renormalisation, all layers MoE, YaRN positions
        "plain-yarn": dict(head_dim=12, num_experts=8, num_experts_per_tok=3,
                           moe_intermediate_size=16, norm_topk_prob=False,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                            "factor": 8.0,
                                            "original_max_position_embeddings": 16}),
    }),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        # softmax top-2 renormalised (Mixtral always renormalises)
        "top2": dict(head_dim=12, num_local_experts=4, num_experts_per_tok=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    }),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {
        # full-width QK-norm (k_norm over H_kv * D), softmax top-k without renormalisation
        "full-qknorm": dict(num_experts=8, num_experts_per_tok=3, eos_token_id=1,
                            pad_token_id=0),
    }),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", {
        # bias on q/k/v, half the head dims rotate, per-head QK-norm, sigmoid + selection bias,
        # 2 of 4 groups, one shared expert, first layer dense, routed_scaling_factor
        "qknorm-groups": dict(head_dim=12, attention_bias=True, use_qk_norm=True,
                              n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                              topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                              moe_intermediate_size=16, routed_scaling_factor=2.5,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5}),
        # no QK-norm, no groups, two shared experts, no renormalisation
        "plain": dict(head_dim=8, attention_bias=True, use_qk_norm=False, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=2,
                      first_k_dense_replace=2, moe_intermediate_size=16, norm_topk_prob=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "partial_rotary_factor": 0.5}),
    }),
}
CASES = [(family, case) for family, (_, _, cases) in FAMILIES.items() for case in cases]

def _save_hf(family, case, folder, seed):
    config_class, model_class, cases = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**BASE, **cases[case]})
    return save_randomised(getattr(transformers, model_class)(config), folder, seed)


def _expert_names(family, layer, expert):
    if family == "mixtral":
        return [f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
                for w in ("w1", "w2", "w3")]
    return [f"model.layers.{layer}.mlp.experts.{expert}.{p}.weight"
            for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("family,case", CASES)
def test_logits_match_transformers(family, case, tmp_path):
    seed = CASES.index((family, case))
    hf_model = _save_hf(family, case, tmp_path, seed=10 + seed)
    # the hub layout: several shards, one tensor per expert, nothing fused
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    last = BASE["num_hidden_layers"] - 1
    for name in _expert_names(family, last, 1):
        assert name in index, name
    assert not any("gate_up_proj" in name for name in index)

    if family == "glm4_moe":  # config.json says one MTP layer; transformers saves none
        with pytest.warns(UserWarning, match="without MTP"):
            model = minimoe.load_pretrained(tmp_path)
        bias = model.layers[-1].mlp.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0
    else:
        model = minimoe.load_pretrained(tmp_path)
    cfg = model.cfg
    assert cfg.attention == "gqa" and cfg.num_key_value_heads == 2
    assert [layer.is_moe for layer in model.layers] == [
        type(layer.mlp).__name__.endswith(("SparseMoeBlock", "MoE")) for layer in hf_model.model.layers]

    ids = torch.randint(0, BASE["vocab_size"], (2, SEQ),
                        generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids).logits
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= ATOL


def test_from_hf_maps_each_family():
    qwen = ModelConfig.from_hf({**BASE, "model_type": "qwen3_moe", "num_experts": 8,
                                "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                "norm_topk_prob": True, "mlp_only_layers": [0, 1],
                                "decoder_sparse_step": 1, "head_dim": 12,
                                "use_sliding_window": False, "sliding_window": 4096})
    assert (qwen.qk_norm, qwen.first_k_dense_replace, qwen.n_shared_experts) == ("per_head", 2, 0)
    assert (qwen.scoring_func, qwen.topk_method, qwen.norm_topk_prob) == ("softmax", "greedy", True)
    assert not qwen.use_expert_bias and qwen.head_dim == 12
    mixtral = ModelConfig.from_hf({**BASE, "model_type": "mixtral", "num_local_experts": 8,
                                   "num_experts_per_tok": 2, "sliding_window": None,
                                   "router_jitter_noise": 0.1})
    assert mixtral.norm_topk_prob and mixtral.moe_intermediate_size == BASE["intermediate_size"]
    assert mixtral.rope_theta == 1e6 and mixtral.first_k_dense_replace == 0
    olmoe = ModelConfig.from_hf({**BASE, "model_type": "olmoe", "num_experts": 8,
                                 "num_experts_per_tok": 8, "num_key_value_heads": 4})
    assert olmoe.qk_norm == "full" and olmoe.attention == "mha" and not olmoe.norm_topk_prob
    # GLM-4.5's own config.json: partial_rotary_factor at the top level, rope_theta, no
    # rope_parameters
    glm = ModelConfig.from_hf({**BASE, "model_type": "glm4_moe", "head_dim": 8,
                               "partial_rotary_factor": 0.5, "rope_theta": 1e6,
                               "rope_scaling": None, "attention_bias": True, "use_qk_norm": False,
                               "n_routed_experts": 8, "n_shared_experts": 1, "n_group": 1,
                               "topk_group": 1, "num_experts_per_tok": 2, "norm_topk_prob": True,
                               "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
                               "moe_intermediate_size": 16, "num_nextn_predict_layers": 1})
    assert (glm.rotary_dim, glm.rope_theta, glm.attention_bias, glm.qk_norm) == (4, 1e6, True, "none")
    assert (glm.scoring_func, glm.topk_method, glm.use_expert_bias) == ("sigmoid", "noaux_tc", True)
    assert glm.num_nextn_predict_layers == 1 and glm.routed_scaling_factor == 2.5


@pytest.mark.parametrize("model_type,changes,key", [
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
    ("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step"),
    ("qwen3_moe", dict(attention_bias=True), "attention_bias"),
    ("qwen3_moe", dict(shared_expert_intermediate_size=32), "shared_expert_intermediate_size"),
    ("qwen3_moe", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                        "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    ("mixtral", dict(sliding_window=16), "sliding_window"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
    ("olmoe", dict(attention_bias=True), "attention_bias"),
    ("glm4_moe", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "longrope"),
    ("glm4_moe", dict(scoring_func="softmax"), "scoring_func"),
    ("glm4_moe", dict(first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "dense"]),
     "mlp_layer_types"),
    ("qwen3_moe", dict(layer_types=["full_attention", "sliding_attention", "full_attention"]),
     "layer_types"),
])
def test_from_hf_refuses_keys_that_change_the_function(model_type, changes, key):
    hf = {**BASE, "model_type": model_type, "num_experts": 8, "num_experts_per_tok": 2,
          "moe_intermediate_size": 16, **changes}
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf(hf)


def test_glm_mtp_layer_loads_into_model_mtp(tmp_path):
    """GLM-4.5 publishes its MTP module as model.layers.{num_hidden_layers}, DeepSeek-V3's layout."""
    from safetensors.torch import save_file

    _save_hf("glm4_moe", "qknorm-groups", tmp_path / "hf", seed=30)
    tensors = read_all(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    n = config["num_hidden_layers"]
    mtp = deepseek_mtp_tensors(tensors, config, block_layer=n - 1, seed=31)
    folder = tmp_path / "with-mtp"
    folder.mkdir()
    save_file({**tensors, **mtp}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    model = minimoe.load_pretrained(folder)
    assert len(model.mtp) == 1
    state = model.state_dict()
    torch.testing.assert_close(state["mtp.0.eh_proj.weight"], mtp[f"model.layers.{n}.eh_proj.weight"])
    torch.testing.assert_close(state["mtp.0.block.self_attn.q_proj.bias"],
                               mtp[f"model.layers.{n}.self_attn.q_proj.bias"])
    torch.testing.assert_close(state["mtp.0.block.mlp.experts.down_proj"][5],
                               mtp[f"model.layers.{n}.mlp.experts.5.down_proj.weight"])
