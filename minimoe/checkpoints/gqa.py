"""Qwen3-MoE, Mixtral, OLMoE and GLM-4.5 (``qwen3_moe``, ``mixtral``, ``olmoe``, ``glm4_moe``):
grouped-query attention + an MoE FFN.

What each family's modeling code does (transformers 5.23 models/<type>/modeling_<type>.py,
which follow the released code), and the minimoe field it becomes:

===============  ==========================  ===========================  ===================
family           attention                   router                       layers
===============  ==========================  ===========================  ===================
qwen3_moe        GQA, per-head QK-norm       softmax top-k, renormalised  dense where
                                             iff norm_topk_prob           mlp_only_layers /
                                                                          decoder_sparse_step
mixtral          GQA                         softmax top-k, always        all MoE
                                             renormalised
olmoe            QK-norm over the full       softmax top-k, renormalised  all MoE
                 projected width             iff norm_topk_prob (false)
glm4_moe         GQA, bias on q/k/v, partial sigmoid + selection bias,    first_k_dense_replace
                 rotary, per-head QK-norm    groups (top-2 sum), renorm,  dense; shared
                 iff use_qk_norm             routed_scaling_factor        experts
===============  ==========================  ===========================  ===================

A key that would make the checkpoint compute something minimoe does not (sliding-window
attention, clipped q/k/v, an o_proj bias, a layer pattern other than "the first k layers
dense", an activation other than SiLU) raises ValueError naming the key. Keys that only affect
training (router_jitter_noise, the dropouts) are ignored.

Names: the Llama attention names (``self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``: (D,)
per head, or the full width (H*D,), (H_kv*D,) for OLMoE) and DeepSeek's mlp.* names, except
Mixtral, which keeps the original Mistral release's names:

    model.layers.{i}.block_sparse_moe.gate.weight             (E, C)   -> mlp.gate.weight
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight   (I, C)   gate_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight   (I, C)   up_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight   (C, I)   down_proj

(transformers 5.x fuses experts in memory, gate_up_proj, but its save_pretrained writes these
per-expert hub names back.) All four rotate in the rotate-half layout, minimoe's own: no rows
are permuted. GLM-4.5's MTP layers (``model.layers.{num_hidden_layers + k}``) have
DeepSeek-V3's layout.
"""

from __future__ import annotations

from minimoe.checkpoints.family import (Family, NameTable, need, read_rope, rejecter,
                                        rope_parameters)

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "olmoe": "OlmoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


def _first_dense_layers(hf: dict, model_type: str, experts: int) -> int:
    """How many leading layers are dense; any other pattern of dense and MoE layers is refused
    (minimoe's rule is "all but the first first_k_dense_replace")."""
    get, reject = hf.get, rejecter(hf, model_type)
    num_layers = hf["num_hidden_layers"]
    first_dense = get("first_k_dense_replace", 0) or 0
    if model_type == "qwen3_moe":
        mlp_only = set(get("mlp_only_layers") or [])
        step = get("decoder_sparse_step", 1) or 1
        sparse = [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
        first_dense = num_layers - len(sparse)
        if experts and sparse != list(range(first_dense, num_layers)):
            key = "mlp_only_layers" if step == 1 else "decoder_sparse_step"
            reject(key, f"makes layers {sparse} sparse, not a dense prefix then all MoE")
    if any(kind != "full_attention" for kind in get("layer_types") or []):
        reject("layer_types", "mixes attention kinds")
    mlp_types = get("mlp_layer_types")
    if mlp_types is not None and list(mlp_types) != (
            ["dense"] * first_dense + ["sparse"] * (num_layers - first_dense)):
        reject("mlp_layer_types", f"is not {first_dense} dense layers then sparse ones")
    if (get("moe_layer_freq", 1) or 1) != 1:
        reject("moe_layer_freq", "makes only some layers MoE")
    return first_dense


def _refuse_other_functions(hf: dict, model_type: str) -> None:
    """Keys whose value would make the checkpoint compute what minimoe does not."""
    get, reject = hf.get, rejecter(hf, model_type)
    if get("hidden_act", "silu") != "silu":
        reject("hidden_act", "is not SwiGLU's silu")
    if model_type == "qwen3_moe":
        if get("shared_expert_intermediate_size"):
            reject("shared_expert_intermediate_size", "asks for a Qwen2-MoE-style gated "
                   "shared expert")
        if get("use_sliding_window") and get("sliding_window") is not None:
            reject("use_sliding_window", f"with sliding_window={get('sliding_window')}")
    elif get("sliding_window") is not None:
        reject("sliding_window", "is set (sliding-window attention)")
    if get("clip_qkv") is not None:
        reject("clip_qkv", "clamps q, k and v")
    if model_type == "glm4_moe":
        if get("scoring_func", "sigmoid") != "sigmoid":
            reject("scoring_func", "is not GLM-4.5's sigmoid")
        if get("topk_method", "noaux_tc") != "noaux_tc":
            reject("topk_method", "is not GLM-4.5's noaux_tc")
    if get("attention_bias", False) and model_type in ("qwen3_moe", "olmoe"):
        reject("attention_bias", "puts a bias on o_proj too (minimoe: q/k/v only)")


def _positions(hf: dict, model_type: str) -> dict:
    """rope_theta, rope_scaling and partial_rotary_factor (transformers >= 5 writes
    rope_parameters; older and published configs put them at the top level)."""
    rope_theta, rope_scaling, extra = read_rope(hf, 1e6 if model_type == "mixtral" else 10000.0)
    partial = extra.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is None:
        partial = 0.5 if model_type == "glm4_moe" else 1.0  # the classes' defaults
    if partial != 1.0 and model_type != "glm4_moe":
        rejecter(hf, model_type)("partial_rotary_factor",
                                  f"is {partial}, but {model_type} rotates whole heads")
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_scaling is not None and kind not in ("linear", "dynamic", "yarn"):
        raise ValueError(f"from_hf({model_type}): rope type {kind!r} (rope_parameters / "
                         "rope_scaling) is not implemented by minimoe.rope")
    return dict(rope_theta=rope_theta, rope_scaling=rope_scaling, partial_rotary_factor=partial)


def config_from_hf(hf: dict, model_type: str) -> dict:
    """ModelConfig fields of a Qwen3-MoE, Mixtral, OLMoE or GLM-4.5 config.json."""
    get = hf.get
    _refuse_other_functions(hf, model_type)
    heads = hf["num_attention_heads"]
    kv_heads = get("num_key_value_heads") or heads
    experts = get("n_routed_experts") or get("num_experts") or get("num_local_experts") or 0
    glm = model_type == "glm4_moe"
    qk_norm = {"qwen3_moe": "per_head", "olmoe": "full", "mixtral": "none",
               "glm4_moe": "per_head" if get("use_qk_norm", False) else "none"}[model_type]
    return dict(
        _positions(hf, model_type),
        name=get("_name_or_path", model_type) or model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=get("max_position_embeddings", 4096),
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_word_embeddings=get("tie_word_embeddings", False),
        attention="gqa" if kv_heads < heads else "mha",
        # MixtralAttention has no bias, whatever the key says
        attention_bias=bool(get("attention_bias", False)) and model_type != "mixtral",
        qk_norm=qk_norm,
        n_routed_experts=experts,
        num_experts_per_tok=get("num_experts_per_tok") or 1,
        moe_intermediate_size=get("moe_intermediate_size") or hf["intermediate_size"],
        n_shared_experts=(get("n_shared_experts", 1) or 0) if glm else 0,
        first_k_dense_replace=_first_dense_layers(hf, model_type, experts),
        scoring_func="sigmoid" if glm else "softmax",
        topk_method="noaux_tc" if glm else "greedy",
        n_group=(get("n_group") or 1) if glm else 1,
        topk_group=(get("topk_group") or 1) if glm else 1,
        norm_topk_prob=True if model_type == "mixtral" else bool(get("norm_topk_prob", glm)),
        routed_scaling_factor=get("routed_scaling_factor", 1.0) if glm else 1.0,
        use_expert_bias=glm,
        aux_loss_alpha=0.0 if glm else get("router_aux_loss_coef", 0.0),
        num_nextn_predict_layers=(get("num_nextn_predict_layers", 0) or 0) if glm else 0,
        mtp_input="post_norm",  # GLM-4.5: vLLM glm4_moe_mtp.py, SGLang glm4_moe_nextn.py
    )


def config_to_hf(cfg, model_type: str) -> dict:
    """The config.json of ``model_type`` that ``config_from_hf`` maps back to cfg."""
    def check(condition, field_name, wanted):
        need(cfg, model_type, condition, field_name, wanted)

    glm = model_type == "glm4_moe"
    check(cfg.attention in ("gqa", "mha"), "attention", "'gqa' or 'mha'")
    check(not cfg.shortcut_moe, "shortcut_moe", "False")
    check(cfg.n_zero_experts == 0, "n_zero_experts", "0 (no zero-computation experts)")
    check(cfg.is_moe, "n_routed_experts", "> 0")
    check(glm or not cfg.attention_bias, "attention_bias", "False")
    check(glm or cfg.partial_rotary_factor == 1.0, "partial_rotary_factor", "1.0")
    check(cfg.scoring_func == ("sigmoid" if glm else "softmax"), "scoring_func",
          "'sigmoid'" if glm else "'softmax'")
    check(cfg.topk_method == ("noaux_tc" if glm else "greedy"), "topk_method",
          "'noaux_tc'" if glm else "'greedy'")
    check(cfg.use_expert_bias == glm, "use_expert_bias", str(glm))
    check(glm or cfg.n_shared_experts == 0, "n_shared_experts", "0")
    check(glm or cfg.num_nextn_predict_layers == 0, "num_nextn_predict_layers", "0")
    check(cfg.num_nextn_predict_layers == 0 or cfg.mtp_input == "post_norm", "mtp_input",
          "'post_norm' with MTP modules (the state runtimes feed them; minimoe.mtp)")
    check(glm or cfg.routed_scaling_factor == 1.0, "routed_scaling_factor", "1.0")
    config = dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
        num_experts_per_tok=cfg.num_experts_per_tok, rope_parameters=rope_parameters(cfg),
    )
    return {**config, **_family_keys(cfg, model_type, check)}


def _family_keys(cfg, model_type: str, check) -> dict:
    """The keys only one GQA family has."""
    if model_type == "qwen3_moe":
        check(cfg.qk_norm == "per_head", "qk_norm", "'per_head'")
        return dict(head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                    num_experts=cfg.n_routed_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                    norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                    mlp_only_layers=list(range(cfg.first_k_dense_replace)),
                    use_sliding_window=False, sliding_window=None, attention_bias=False,
                    router_aux_loss_coef=cfg.aux_loss_alpha)
    if model_type == "glm4_moe":
        check(cfg.qk_norm in ("per_head", "none"), "qk_norm", "'per_head' or 'none'")
        parameters = dict(rope_parameters(cfg), partial_rotary_factor=cfg.partial_rotary_factor)
        return dict(head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                    rope_parameters=parameters, attention_bias=cfg.attention_bias,
                    use_qk_norm=cfg.qk_norm == "per_head", n_routed_experts=cfg.n_routed_experts,
                    moe_intermediate_size=cfg.moe_intermediate_size,
                    n_shared_experts=cfg.n_shared_experts,
                    first_k_dense_replace=cfg.first_k_dense_replace, n_group=cfg.n_group,
                    topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                    routed_scaling_factor=cfg.routed_scaling_factor,
                    num_nextn_predict_layers=cfg.num_nextn_predict_layers)
    check(cfg.first_k_dense_replace == 0, "first_k_dense_replace", "0 (every layer MoE)")
    if model_type == "mixtral":
        check(cfg.qk_norm == "none", "qk_norm", "'none'")
        check(cfg.norm_topk_prob, "norm_topk_prob", "True")
        return dict(head_dim=cfg.head_dim, intermediate_size=cfg.moe_intermediate_size,
                    num_local_experts=cfg.n_routed_experts, sliding_window=None,
                    router_aux_loss_coef=cfg.aux_loss_alpha)
    check(cfg.qk_norm == "full", "qk_norm", "'full'")  # olmoe
    check(cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size, "head_dim",
          f"hidden_size / num_attention_heads = {cfg.hidden_size // cfg.num_attention_heads}")
    return dict(intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
                norm_topk_prob=cfg.norm_topk_prob, router_aux_loss_coef=cfg.aux_loss_alpha,
                attention_bias=False, clip_qkv=None)


def _family(model_type: str, names: NameTable = NameTable()) -> Family:
    return Family(model_types=(model_type,), architectures=ARCHITECTURES,
                  config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=names)


QWEN3_MOE = _family("qwen3_moe")
MIXTRAL = _family("mixtral", NameTable(
    layer={"block_sparse_moe.gate.weight": "mlp.gate.weight"},
    experts="block_sparse_moe.experts",
    projections={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}))
OLMOE = _family("olmoe")
GLM4_MOE = _family("glm4_moe")
