"""ModelConfig: validation names the field and the rule; presets; from_hf; replace."""

import json

import pytest

from minimoe.config import PRESETS, ModelConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    cfg = ModelConfig.preset(name)
    assert cfg.name == name
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0


@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(attention="gqa", num_key_value_heads=3), "num_key_value_heads"),
    (dict(attention="mha", num_key_value_heads=2), "num_key_value_heads"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
    (dict(rope_scaling={"type": "yarn", "factor": 0.5}), "factor"),
    (dict(n_group=8, topk_group=1, num_experts_per_tok=4), "topk_group"),
    (dict(mtp_input="normed"), "mtp_input"),
])
def test_impossible_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("toy", **changes)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("gpt-5")
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.preset("toy").replace(n_experts=4)
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.from_dict({"hidden": 3})


def test_replace_rederives_derived_fields():
    cfg = ModelConfig.preset("toy-gqa").replace(hidden_size=256)
    assert cfg.head_dim == 256 // cfg.num_attention_heads
    cfg = ModelConfig(attention="mha").replace(num_attention_heads=8)
    assert cfg.num_key_value_heads == 8
    # an explicitly given value stays
    assert ModelConfig.preset("qwen3-30b-a3b").replace(hidden_size=1024).head_dim == 128


def test_round_trip_through_dict():
    cfg = ModelConfig.preset("deepseek-v3")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for mtp_input in ("post_norm", "pre_norm"):
        cfg = ModelConfig.preset("toy", mtp_input=mtp_input)
        assert ModelConfig.from_dict(cfg.to_dict()).mtp_input == mtp_input


def test_a_saved_config_without_mtp_input_keeps_the_pre_norm_input_it_was_trained_with():
    saved = ModelConfig.preset("toy").to_dict()
    del saved["mtp_input"]  # written before the field existed: the MTP read the pre-norm state
    assert ModelConfig.from_dict(saved).mtp_input == "pre_norm"
    assert ModelConfig.preset("toy").mtp_input == "post_norm"  # new models: what runtimes do


def test_from_hf_deepseek_v3_config(tmp_path):
    """A (shortened) DeepSeek-V3 config.json as published maps onto the preset's fields."""
    hf = {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = ModelConfig.from_hf(tmp_path)
    preset = ModelConfig.preset("deepseek-v3")
    for field in ("hidden_size", "n_routed_experts", "num_experts_per_tok", "n_group",
                  "topk_group", "routed_scaling_factor", "q_lora_rank", "kv_lora_rank",
                  "qk_rope_head_dim", "first_k_dense_replace", "scoring_func", "topk_method",
                  "use_expert_bias", "num_nextn_predict_layers", "rope_scaling"):
        assert getattr(cfg, field) == getattr(preset, field), field
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "llama"})
