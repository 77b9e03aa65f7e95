"""DeepSeek-V3 / V3.1, Moonlight and Kimi-K2 (``deepseek_v3``, ``kimi_k2``), DeepSeek-V2
(``deepseek_v2``): Multi-head Latent Attention checkpoints.

Config: the HF DeepSeek-V3 config.json names are minimoe's own (``minimoe.config``), so the
mapping is nearly the identity. The DeepSeek-V3 modeling code (DeepSeek's inference/model.py
and transformers' DeepseekV3) always routes with sigmoid scores, a selection bias and
top-2-sum group scores; transformers' config.json omits those keys, DeepSeek's spells them
out. V2 routes with a softmax and, with groups, ``group_limited_greedy`` (group score = max).
``aux_loss_alpha`` is the sequence-wise loss's alpha when ``seq_aux`` is true.

Names: the default ``NameTable`` (DeepSeek-V3's names are the reference layout):

    model.layers.{i}.self_attn.q_a_proj / q_a_layernorm / q_b_proj (or q_proj, V2-Lite)
    model.layers.{i}.self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj / o_proj
    model.layers.{i}.mlp.gate.weight, mlp.gate.e_score_correction_bias (V3, float32)
    model.layers.{i}.mlp.shared_experts.*, mlp.experts.{e}.{gate,up,down}_proj.weight
    model.layers.{num_hidden_layers + k}.*   MTP module k (enorm, hnorm, eh_proj,
        shared_head.norm, copies of embed_tokens and shared_head.head, a decoder layer)

RoPE: DeepSeek trained with the interleaved layout. transformers rotates deepseek_v3
interleaved when ``rope_interleave`` is true (the default when the key is absent, as in
DeepSeek's own config.json) and always for deepseek_v2; saving writes interleaved rows and
``rope_interleave: true``.
"""

from __future__ import annotations

from minimoe.checkpoints.family import Family, need, read_rope, rope_parameters


def config_from_hf(hf: dict, model_type: str) -> dict:
    """ModelConfig fields of a DeepSeek-V3 / V2 / Kimi-K2 config.json."""
    get = hf.get
    rope_theta, rope_scaling, _ = read_rope(hf, 10000.0)
    v3 = model_type != "deepseek_v2"
    topk_method = get("topk_method", "noaux_tc" if v3 else "greedy")
    n_group = get("n_group") or 1
    if n_group > 1 and topk_method == "greedy":
        topk_method = "group_limited_greedy"
    seq_aux = get("seq_aux", False)
    return dict(
        name=get("_name_or_path", model_type) or model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        # MLA has no key/value heads of its own (one latent, expanded per query head); the
        # num_key_value_heads in these configs is unused (transformers writes its class default)
        num_key_value_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=get("max_position_embeddings", 4096),
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_word_embeddings=get("tie_word_embeddings", False),
        attention="mla",
        attention_bias=get("attention_bias", False),
        q_lora_rank=get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        n_routed_experts=get("n_routed_experts") or 0,
        num_experts_per_tok=get("num_experts_per_tok") or 1,
        moe_intermediate_size=get("moe_intermediate_size") or 1,
        n_shared_experts=get("n_shared_experts") or 0,
        first_k_dense_replace=get("first_k_dense_replace", 0),
        scoring_func=get("scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method=topk_method,
        n_group=n_group,
        topk_group=get("topk_group") or 1,
        norm_topk_prob=get("norm_topk_prob", v3),
        routed_scaling_factor=get("routed_scaling_factor", 1.0),
        use_expert_bias=topk_method == "noaux_tc",
        aux_loss_alpha=0.0 if seq_aux else get("aux_loss_alpha", 0.0),
        seq_aux_loss_alpha=get("aux_loss_alpha", 0.0) if seq_aux else 0.0,
        num_nextn_predict_layers=get("num_nextn_predict_layers", 0),
        mtp_input="post_norm",  # vLLM deepseek_mtp.py, SGLang deepseek_nextn.py (minimoe.mtp)
    )


def config_to_hf(cfg, model_type: str) -> dict:
    """The deepseek_v3 / deepseek_v2 config.json that ``config_from_hf`` maps back to cfg."""
    def check(condition, field_name, wanted):
        need(cfg, model_type, condition, field_name, wanted)

    check(cfg.attention == "mla", "attention", "'mla'")
    check(not cfg.shortcut_moe, "shortcut_moe", "False")
    check(cfg.n_zero_experts == 0, "n_zero_experts", "0 (no zero-computation experts)")
    check(not (cfg.mla_scale_q_lora or cfg.mla_scale_kv_lora), "mla_scale_q_lora",
          "no LongCat MLA scales")
    check(cfg.qk_norm == "none", "qk_norm", "'none'")
    check(cfg.partial_rotary_factor == 1.0, "partial_rotary_factor", "1.0")
    if model_type == "deepseek_v3":
        check(cfg.scoring_func == "sigmoid", "scoring_func", "'sigmoid'")
        check(cfg.topk_method == "noaux_tc", "topk_method", "'noaux_tc'")
        check(cfg.use_expert_bias, "use_expert_bias", "True")
    else:
        check(cfg.scoring_func == "softmax", "scoring_func", "'softmax'")
        check(cfg.topk_method in ("greedy", "group_limited_greedy"), "topk_method",
              "'greedy' or 'group_limited_greedy'")
        check(not cfg.use_expert_bias, "use_expert_bias", "False")
    check(cfg.num_nextn_predict_layers == 0 or cfg.mtp_input == "post_norm", "mtp_input",
          "'post_norm' with MTP modules (the state runtimes feed them; minimoe.mtp)")
    check(cfg.aux_loss_alpha == 0.0 or cfg.seq_aux_loss_alpha == 0.0, "aux_loss_alpha",
          "0 when seq_aux_loss_alpha is set (one aux_loss_alpha key serves both)")
    config = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
        rope_parameters=rope_parameters(cfg), moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.first_k_dense_replace,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, attention_bias=cfg.attention_bias,
        scoring_func=cfg.scoring_func, topk_method=cfg.topk_method, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        seq_aux=cfg.seq_aux_loss_alpha > 0,
        aux_loss_alpha=cfg.seq_aux_loss_alpha or cfg.aux_loss_alpha,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers,
    )
    if model_type == "deepseek_v3":
        config["rope_interleave"] = True  # the weights are written in DeepSeek's layout
    return config


def rope_interleaved(hf: dict) -> bool:
    if hf.get("model_type") == "deepseek_v2":
        return True  # DeepSeek-V2's code (and transformers' DeepseekV2) always is
    return bool(hf.get("rope_interleave", True))


ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM"}
DEEPSEEK_V3 = Family(model_types=("deepseek_v3", "kimi_k2"), architectures=ARCHITECTURES,
                     config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                     rope_interleaved=rope_interleaved)
DEEPSEEK_V2 = Family(model_types=("deepseek_v2",), architectures=ARCHITECTURES,
                     config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                     rope_interleaved=rope_interleaved)
