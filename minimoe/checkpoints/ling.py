"""Ling-2.0: Ling-mini/flash-2.0 (``bailing_moe_v2``; inclusionAI's configuration_ and
modeling_bailing_moe_v2.py).

Config: GQA with per-head QK-norm (use_qk_norm) and partial rotary (partial_rotary_factor, or
Ling-1T's rotary_dim), a sigmoid router with a selection bias (expert_bias, when
moe_router_enable_expert_bias), groups scored by their top-2 sum, renormalised gates times
routed_scaling_factor (the gate renormalises whenever top-k > 1; the config's norm_topk_prob is
not read by the modeling code), num_shared_experts shared experts of width
moe_intermediate_size, the first first_k_dense_replace layers dense. Key names: num_experts,
num_shared_experts, score_function, use_qkv_bias (q/k/v bias), use_bias (o_proj bias: refused).

Names: GQA with its own names, the DeepSeek mlp.* names otherwise:

    model.word_embeddings.weight                     -> embed_tokens.weight
    model.layers.{i}.attention.query_key_value.weight  ((H + 2 H_kv) D, C): rows of q, then k,
                                                     then v -> self_attn.{q,k,v}_proj (fused)
    model.layers.{i}.attention.dense.weight          -> self_attn.o_proj.weight
    model.layers.{i}.attention.{query,key}_layernorm.weight (D,) -> self_attn.{q,k}_norm.weight
    model.layers.{i}.mlp.gate.expert_bias            -> mlp.gate.e_score_correction_bias
    model.layers.{L + k}.final_layernorm.weight      MTP module k's last norm; its other names
                                                     are DeepSeek-V3's (enorm, hnorm, eh_proj,
                                                     the block)

Ling rotates in the rotate-half layout (the first head_dim * partial_rotary_factor dims of
each head): nothing is permuted.
"""

from __future__ import annotations

from minimoe.checkpoints.family import Family, MtpNames, NameTable, need, rejecter

ARCHITECTURES = {"bailing_moe_v2": "BailingMoeV2ForCausalLM"}


def _refuse_other_functions(hf: dict) -> None:
    get = hf.get

    reject = rejecter(hf, "bailing_moe_v2")

    if get("hidden_act", "silu") != "silu":
        reject("hidden_act", "is not SwiGLU's silu")
    if get("use_bias", False):
        reject("use_bias", "puts a bias on the attention output projection")
    if get("norm_head", False):
        reject("norm_head", "normalises the output head's rows")
    if get("use_sliding_window", False):
        reject("use_sliding_window", "asks for sliding-window attention")
    if get("score_function", "sigmoid") != "sigmoid":
        reject("score_function", "is not Ling-2.0's sigmoid")
    if get("rope_scaling") is not None:
        reject("rope_scaling", "changes the positions (the published Ling-2.0 configs have none)")
    shared, width = get("num_shared_experts") or 0, get("moe_intermediate_size")
    if shared and get("moe_shared_expert_intermediate_size") not in (None, shared * width):
        reject("moe_shared_expert_intermediate_size",
               f"differs from num_shared_experts * moe_intermediate_size = {shared * width}")


def config_from_hf(hf: dict, model_type: str = "bailing_moe_v2") -> dict:
    """ModelConfig fields of a Ling-2.0 config.json (module docstring)."""
    get = hf.get
    _refuse_other_functions(hf)
    heads = hf["num_attention_heads"]
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hf["hidden_size"] // heads
    partial = get("partial_rotary_factor", 1.0) or 1.0
    if get("rotary_dim"):
        partial = get("rotary_dim") / head_dim
    top_k = get("num_experts_per_tok") or 1
    return dict(
        name=get("_name_or_path", "bailing_moe_v2") or "bailing_moe_v2",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=get("max_position_embeddings", 32768),
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_word_embeddings=get("tie_word_embeddings", False),
        attention="gqa" if kv_heads < heads else "mha",
        attention_bias=get("use_qkv_bias", False),
        qk_norm="per_head" if get("use_qk_norm", False) else "none",
        rope_theta=get("rope_theta", 600000.0),
        partial_rotary_factor=partial,
        n_routed_experts=get("num_experts") or 0,
        num_experts_per_tok=top_k,
        moe_intermediate_size=get("moe_intermediate_size") or 1,
        n_shared_experts=get("num_shared_experts") or 0,
        first_k_dense_replace=get("first_k_dense_replace", 0) or 0,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=get("n_group") or 1,
        topk_group=get("topk_group") or 1,
        norm_topk_prob=top_k > 1,  # BailingMoeV2Gate renormalises whenever top_k > 1
        routed_scaling_factor=get("routed_scaling_factor", 1.0),
        use_expert_bias=get("moe_router_enable_expert_bias", True),
        num_nextn_predict_layers=get("num_nextn_predict_layers", 0) or 0,
        mtp_input="post_norm",  # inclusionAI modeling_bailing_moe_v2.py, BailingMoeV2Model
    )


def config_to_hf(cfg, model_type: str = "bailing_moe_v2") -> dict:
    """The Ling-2.0 config.json that ``config_from_hf`` maps back to cfg."""
    def check(condition, field_name, wanted):
        need(cfg, model_type, condition, field_name, wanted)

    check(cfg.attention in ("gqa", "mha"), "attention", "'gqa' or 'mha'")
    check(not cfg.shortcut_moe and cfg.n_zero_experts == 0, "shortcut_moe",
          "False (and no zero-computation experts)")
    check(cfg.is_moe, "n_routed_experts", "> 0")
    check(cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc", "scoring_func",
          "'sigmoid' with topk_method 'noaux_tc'")
    check(cfg.norm_topk_prob == (cfg.num_experts_per_tok > 1), "norm_topk_prob",
          "True exactly when num_experts_per_tok > 1 (BailingMoeV2Gate's rule)")
    check(cfg.qk_norm in ("per_head", "none"), "qk_norm", "'per_head' or 'none'")
    check(cfg.rope_scaling is None, "rope_scaling", "None")
    check(cfg.num_nextn_predict_layers == 0 or cfg.mtp_input == "post_norm", "mtp_input",
          "'post_norm' with MTP modules (the state runtimes feed them; minimoe.mtp)")
    return dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
        use_qkv_bias=cfg.attention_bias, use_bias=False, use_qk_norm=cfg.qk_norm == "per_head",
        rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.partial_rotary_factor,
        num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.first_k_dense_replace,
        score_function="sigmoid", n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
        moe_router_enable_expert_bias=cfg.use_expert_bias,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers,
    )


LING_2 = Family(
    model_types=("bailing_moe_v2",), architectures=ARCHITECTURES,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    names=NameTable(
        top={"model.word_embeddings.weight": "embed_tokens.weight",
             "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"},
        layer={"mlp.gate.expert_bias": "mlp.gate.e_score_correction_bias",
               "attention.query_key_value.weight": "self_attn.query_key_value.weight",
               "attention.query_key_value.bias": "self_attn.query_key_value.bias",
               "attention.dense.weight": "self_attn.o_proj.weight",
               "attention.query_layernorm.weight": "self_attn.q_norm.weight",
               "attention.key_layernorm.weight": "self_attn.k_norm.weight"},
        fused={"self_attn.query_key_value": ("self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj")},
        mtp=MtpNames(own={"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                          "eh_proj.weight": "eh_proj.weight",
                          "final_layernorm.weight": "final_norm.weight"},
                     shared_copies={})))
