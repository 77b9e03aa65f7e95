"""LongCat-Flash (``longcat_flash``; transformers LongcatFlash and the hub checkpoint).

Config: its own key names: num_layers (each layer = two MLA sublayers, so transformers'
num_hidden_layers is 2 * num_layers), ffn_hidden_size (the dense FFNs),
expert_ffn_hidden_size, moe_topk, zero_expert_num (identity experts). The router is a softmax
over all n_routed_experts + zero_expert_num logits, top-k on the scores plus the selection
bias e_score_correction_bias, gates = unrenormalised scores * routed_scaling_factor (identity
experts included); every layer has the shortcut MoE (``minimoe.block.ShortcutDecoderLayer``),
no shared experts. The MLA latent scales are always on in transformers; the hub's config.json
spells them out (mla_scale_q_lora / mla_scale_kv_lora). RoPE rotates head_dim
(= qk_rope_head_dim) dims, interleaved, like DeepSeek: rope rows are permuted.

Names: the MLA names twice per layer, the DeepSeek expert names, and its own router name:

    model.layers.{i}.self_attn.{0,1}.<MLA names>             two attention sublayers
    model.layers.{i}.mlps.{0,1}.{gate,up,down}_proj.weight   two dense FFNs
    model.layers.{i}.input_layernorm.{0,1}.weight, post_attention_layernorm.{0,1}.weight
    model.layers.{i}.mlp.router.classifier.weight            (E + Z, C) -> mlp.gate.weight
    model.layers.{i}.mlp.router.e_score_correction_bias      (E + Z,)   -> mlp.gate.e_score_...
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   e < E (FFN experts only)

The identity experts hold no weights. transformers 5.23 keeps a fused gate_up_proj with a row
block for *every* expert, identity ones included (never used), so its save_pretrained also
writes mlp.experts.{e}.{gate,up}_proj.weight for E <= e < E + Z: those are skipped.

MTP: one module under ``model.mtp.`` (not counted in config.json; transformers builds none and
saves none, and ``load_pretrained`` builds it exactly when the checkpoint holds model.mtp.*):

    model.mtp.embed_tokens.weight                       the main embedding's copy: not read
    model.mtp.layers.0.enorm.m.weight, hnorm.m.weight   -> mtp.0.enorm / hnorm.weight
    model.mtp.layers.0.eh_proj.weight                   (C, 2C) -> mtp.0.eh_proj.weight
    model.mtp.layers.0.{input,post_attention}_layernorm.weight -> mtp.0.block.<same>
    model.mtp.layers.0.self_attn.<MLA names>            -> mtp.0.block.self_attn.<same>
    model.mtp.layers.0.transformer_layer.mlp.{gate,up,down}_proj.weight -> mtp.0.block.mlp.<same>
    model.mtp.norm.weight                               -> mtp.0.final_norm.weight

minimoe shares the main embedding with its MTP module, as the runtimes that serve LongCat-Flash
with MTP drafts (SGLang, vLLM) do -- they too ignore the copy -- and comparing the copy with
the main embedding would read a second (V, C) table (1.6 GB in bf16) on every load.
"""

from __future__ import annotations

from minimoe.checkpoints.family import (Family, MtpNames, NameTable, need, read_rope, rejecter,
                                        rope_parameters)

ARCHITECTURES = {"longcat_flash": "LongcatFlashForCausalLM"}


def config_from_hf(hf: dict, model_type: str = "longcat_flash") -> dict:
    """ModelConfig fields of a LongCat-Flash config.json (module docstring). The MTP depth is
    the config's num_nextn_predict_layers when it has one (0 or 1), else 0."""
    get = hf.get

    reject = rejecter(hf, "longcat_flash")

    if get("hidden_act", "silu") != "silu":
        reject("hidden_act", "is not SwiGLU's silu")
    if get("router_bias", False):
        reject("router_bias", "puts a bias on the router logits")
    if get("zero_expert_type", "identity") != "identity":
        reject("zero_expert_type", "is not the identity")
    if (get("num_nextn_predict_layers") or 0) not in (0, 1):
        reject("num_nextn_predict_layers", "asks for more than the one MTP module (model.mtp.*) "
               "of LongCat-Flash's checkpoint layout")
    rope = get("qk_rope_head_dim", 64)
    if get("head_dim") not in (None, rope):
        reject("head_dim", f"sets the rotary width, which differs from qk_rope_head_dim={rope}")
    rope_theta, rope_scaling, _ = read_rope(hf, 10000000.0)
    return dict(
        name=get("_name_or_path", "longcat_flash") or "longcat_flash",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=get("num_layers") or hf["num_hidden_layers"] // 2,
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_attention_heads"],  # MLA: unused, as for DeepSeek
        intermediate_size=get("ffn_hidden_size") or get("intermediate_size") or 12288,
        max_position_embeddings=get("max_position_embeddings", 131072),
        rms_norm_eps=get("rms_norm_eps", 1e-5),
        tie_word_embeddings=get("tie_word_embeddings", False),
        attention="mla",
        attention_bias=get("attention_bias", False),
        q_lora_rank=get("q_lora_rank", 1536),
        kv_lora_rank=get("kv_lora_rank", 512),
        qk_nope_head_dim=get("qk_nope_head_dim", 128),
        qk_rope_head_dim=rope,
        v_head_dim=get("v_head_dim", 128),
        mla_scale_q_lora=get("mla_scale_q_lora", True),
        mla_scale_kv_lora=get("mla_scale_kv_lora", True),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        n_routed_experts=get("n_routed_experts", 512),
        n_zero_experts=get("zero_expert_num") or 0,
        num_experts_per_tok=get("moe_topk") or get("num_experts_per_tok") or 12,
        moe_intermediate_size=get("expert_ffn_hidden_size") or get("moe_intermediate_size")
        or 2048,
        n_shared_experts=0, first_k_dense_replace=0, scoring_func="softmax",
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=get("routed_scaling_factor", 6.0),
        use_expert_bias=True,
        shortcut_moe=True,
        num_nextn_predict_layers=get("num_nextn_predict_layers") or 0,
        mtp_input="post_norm",  # vLLM longcat_flash_mtp.py, SGLang longcat_flash_nextn.py
    )


def config_to_hf(cfg, model_type: str = "longcat_flash") -> dict:
    """The LongCat-Flash config.json that ``config_from_hf`` maps back to cfg."""
    def check(condition, field_name, wanted):
        need(cfg, model_type, condition, field_name, wanted)

    check(cfg.shortcut_moe, "shortcut_moe", "True (LongCat's shortcut-connected block)")
    check(cfg.attention == "mla", "attention", "'mla'")
    check(cfg.scoring_func == "softmax" and cfg.topk_method == "greedy", "scoring_func",
          "'softmax' with topk_method 'greedy'")
    check(not cfg.norm_topk_prob, "norm_topk_prob", "False")
    check(cfg.use_expert_bias, "use_expert_bias", "True")
    check(cfg.n_shared_experts == 0, "n_shared_experts", "0")
    check(cfg.first_k_dense_replace == 0, "first_k_dense_replace", "0")
    check(cfg.mla_scale_q_lora and cfg.mla_scale_kv_lora, "mla_scale_q_lora",
          "True (with mla_scale_kv_lora: transformers always scales the latents)")
    check(cfg.qk_norm == "none" and cfg.partial_rotary_factor == 1.0, "qk_norm",
          "'none' (and partial_rotary_factor 1.0)")
    check(cfg.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "0 or 1")
    check(cfg.num_nextn_predict_layers == 0 or cfg.mtp_input == "post_norm", "mtp_input",
          "'post_norm' with MTP modules (the state runtimes feed them; minimoe.mtp)")
    return dict(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
        attention_bias=cfg.attention_bias, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, mla_scale_q_lora=True, mla_scale_kv_lora=True,
        rope_parameters=rope_parameters(cfg), n_routed_experts=cfg.n_routed_experts,
        zero_expert_num=cfg.n_zero_experts, zero_expert_type="identity",
        moe_topk=cfg.num_experts_per_tok, expert_ffn_hidden_size=cfg.moe_intermediate_size,
        routed_scaling_factor=cfg.routed_scaling_factor,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers,
    )


LONGCAT_FLASH = Family(
    model_types=("longcat_flash",), architectures=ARCHITECTURES,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    rope_interleaved=lambda hf: True,  # transformers' LongcatFlashMLA: apply_rotary_pos_emb_interleave
    names=NameTable(
        layer={"mlp.router.classifier.weight": "mlp.gate.weight",
               "mlp.router.e_score_correction_bias": "mlp.gate.e_score_correction_bias"},
        mtp=MtpNames(
            prefix="model.mtp.",
            own={"layers.0.enorm.m.weight": "enorm.weight",
                 "layers.0.hnorm.m.weight": "hnorm.weight",
                 "layers.0.eh_proj.weight": "eh_proj.weight",
                 "layers.0.transformer_layer.mlp.gate_proj.weight": "block.mlp.gate_proj.weight",
                 "layers.0.transformer_layer.mlp.up_proj.weight": "block.mlp.up_proj.weight",
                 "layers.0.transformer_layer.mlp.down_proj.weight": "block.mlp.down_proj.weight",
                 "norm.weight": "final_norm.weight"},
            shared_copies={"embed_tokens.weight": "embed_tokens.weight"},
            block="layers.0.")))
