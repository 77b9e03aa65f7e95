"""ModelConfig: every architectural knob minimoe teaches, in one validated dataclass.

The idea
--------
A modern MoE language model is a standard pre-norm decoder-only transformer in which
most feed-forward blocks are replaced by a *mixture of experts*: a router picks, for
every token, a few experts out of many, and only those run. Everything that differs
between DeepSeek-V3, Ling-2.0, LongCat-Flash, Qwen3-MoE, Mixtral and OLMoE is a choice
among a handful of knobs, and this file names them all:

* attention:  "mha" / "gqa" (num_key_value_heads < num_attention_heads) / "mla"
  (DeepSeek's Multi-head Latent Attention: q_lora_rank, kv_lora_rank, qk_nope_head_dim,
  qk_rope_head_dim, v_head_dim), optional QK-norm ("per_head" as in Qwen3 and Ling-2.0,
  "full" width as in OLMoE), partial RoPE (partial_rotary_factor, Ling-2.0 uses 0.5).
* the router: scoring_func "softmax" (Mixtral, OLMoE, Qwen3, DeepSeek-V2, LongCat) or
  "sigmoid" (DeepSeek-V3, Ling-2.0); top-k = num_experts_per_tok; norm_topk_prob
  (renormalise the chosen k gates); routed_scaling_factor; group-limited routing
  (n_group, topk_group, with the group score chosen by topk_method); an expert bias used
  only for *selection* (use_expert_bias, the auxiliary-loss-free balancing of
  DeepSeek-V3 §2.1.2); noisy top-k gating (Shazeer et al. 2017).
* the experts: n_routed_experts fine-grained experts of width moe_intermediate_size,
  n_shared_experts always-on experts, n_zero_experts zero-computation (identity)
  experts (LongCat-Flash), the first first_k_dense_replace layers dense.
* balance: aux_loss_alpha (Switch/GShard), seq_aux_loss_alpha (DeepSeek-V3 Eq. 17-20),
  z_loss_coef (ST-MoE), bias_update_rate (gamma of the aux-loss-free update),
  capacity_factor (token dropping).
* MTP: num_nextn_predict_layers modules, weighted by mtp_loss_weight (DeepSeek-V3 §2.2).

Names follow the Hugging Face DeepSeek-V3 ``config.json`` wherever a name exists there, so
``ModelConfig.from_hf(config_json)`` is a thin mapping; fields with no HF name use plain
words. An impossible combination raises ``ValueError`` naming the field and the rule.

Presets
-------
``ModelConfig.preset(name)`` returns the published dimensions of a real model (for
sizing: parameter counts, FLOPs, KV-cache bytes; see ``minimoe.sizing``) or a small
trainable model ("toy", "toy-classic", "toy-gqa", "toy-dense"). The numbers of the
published presets come from each model's public ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

ATTENTION_KINDS = ("mha", "gqa", "mla")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
QK_NORM_KINDS = ("none", "per_head", "full")
DISPATCH_KINDS = ("naive", "sorted")
KERNEL_KINDS = ("reference", "triton")


@dataclass
class ModelConfig:
    """All architectural and balancing knobs of a minimoe model (see the module docstring)."""

    name: str = "custom"

    # ---- sizes (HF names) -------------------------------------------------------------
    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None -> = num_attention_heads (MHA)
    head_dim: Optional[int] = None  # MHA/GQA head width; None -> hidden_size // heads
    intermediate_size: int = 512  # dense FFN width (first_k_dense_replace layers)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    # ---- attention ---------------------------------------------------------------------
    attention: str = "mla"  # "mha" | "gqa" | "mla"
    attention_bias: bool = False  # bias on q/k/v projections (GLM-4.5, Qwen2)
    qk_norm: str = "none"  # "none" | "per_head" (Qwen3, Ling-2.0) | "full" (OLMoE)
    # MLA (DeepSeek-V2 §2.1); q_lora_rank None = full-rank query (DeepSeek-V2-Lite)
    q_lora_rank: Optional[int] = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # LongCat-Flash multiplies the up-projected query by sqrt(hidden/q_lora_rank) and the
    # normalised kv latent by sqrt(hidden/kv_lora_rank) (transformers LongcatFlashMLA)
    mla_scale_q_lora: bool = False
    mla_scale_kv_lora: bool = False

    # ---- positions ----------------------------------------------------------------------
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF dict: {"type"/"rope_type": "yarn", "factor": ...}
    partial_rotary_factor: float = 1.0  # fraction of each head's dims that rotate

    # ---- mixture of experts ------------------------------------------------------------
    n_routed_experts: int = 16  # 0 = a dense model
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    n_shared_experts: int = 1
    n_zero_experts: int = 0  # LongCat-Flash zero-computation (identity) experts
    first_k_dense_replace: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"  # "greedy" | "group_limited_greedy" (V2) | "noaux_tc" (V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    use_expert_bias: bool = True  # selection-only bias (aux-loss-free balancing)
    noisy_gating: bool = False  # Shazeer et al. 2017 noisy top-k (training only)
    capacity_factor: Optional[float] = None  # None = no token dropping

    # ---- load balancing ------------------------------------------------------------------
    aux_loss_alpha: float = 0.0  # Switch/GShard batch-wise auxiliary loss
    seq_aux_loss_alpha: float = 0.0  # DeepSeek-V3 sequence-wise auxiliary loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # gamma of b_i += gamma * sign(mean_load - load_i)
    bias_update_zero_mean: bool = True  # subtract the mean of the update (torchtitan, Ling)

    # ---- multi-token prediction ----------------------------------------------------------
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3

    # ---- LongCat-Flash block shape (shortcut-connected MoE: minimoe.block.ShortcutDecoderLayer) -
    shortcut_moe: bool = False

    # ---- execution choices (do not change the function, only how it is computed) ---------
    dispatch: str = "sorted"  # "naive" per-expert loop | "sorted" grouped matmul
    kernels: str = "reference"  # the one kernel switch: "reference" | "triton"
    # FP8 training (DeepSeek-V3 §3.3, minimoe.fp8): True runs the GEMMs of the experts (routed,
    # shared, dense FFN) and the attention projections as simulated e4m3 GEMMs with 1x128 /
    # 128x128 scales and float32 master weights; embedding, output head, router, norms and
    # the attention operator stay high precision. Applied by minimoe.fp8.convert_to_fp8.
    fp8: bool = False

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # fields filled in from others; replace() derives them again unless given
        self._derived_fields = {name for name in ("num_key_value_heads", "head_dim")
                                if getattr(self, name) is None}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.attention == "mla":
            self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim  # MLA's q/k head width
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) unless head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the rule for every impossible setting."""

        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"ModelConfig({self.name}): {message}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.attention in ATTENTION_KINDS,
             f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        need(self.scoring_func in SCORING_FUNCS,
             f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        need(self.topk_method in TOPK_METHODS,
             f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        need(self.qk_norm in QK_NORM_KINDS,
             f"qk_norm must be one of {QK_NORM_KINDS}, got {self.qk_norm!r}")
        need(self.dispatch in DISPATCH_KINDS,
             f"dispatch must be one of {DISPATCH_KINDS}, got {self.dispatch!r}")
        need(self.kernels in KERNEL_KINDS,
             f"kernels must be one of {KERNEL_KINDS}, got {self.kernels!r}")
        need(isinstance(self.fp8, bool), f"fp8 must be True or False, got {self.fp8!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.attention == "mha":
            need(self.num_key_value_heads == self.num_attention_heads,
                 "attention='mha' needs num_key_value_heads == num_attention_heads "
                 f"(got {self.num_key_value_heads} vs {self.num_attention_heads}); use 'gqa'")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) > 0, f"{name} must be > 0 for attention='mla'")
            need(self.q_lora_rank is None or self.q_lora_rank > 0,
                 f"q_lora_rank must be None (full-rank query) or > 0, got {self.q_lora_rank}")
            need(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
            need(not self.mla_scale_q_lora or self.q_lora_rank is not None,
                 "mla_scale_q_lora scales by sqrt(hidden_size / q_lora_rank): it needs a "
                 "q_lora_rank (got None)")
            need(self.qk_norm == "none", "qk_norm is not defined for attention='mla' (MLA has "
                 "its own latent norms); set qk_norm='none'")
        need(0.0 < self.partial_rotary_factor <= 1.0,
             f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.attention != "mla":
            rotary = int(self.head_dim * self.partial_rotary_factor)
            need(rotary % 2 == 0 and rotary > 0,
                 f"head_dim * partial_rotary_factor ({self.head_dim} * "
                 f"{self.partial_rotary_factor} = {rotary}) must be a positive even number")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict), "rope_scaling must be a dict or None")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind in ("default", "linear", "dynamic", "ntk", "yarn"),
                 f"rope_scaling type must be default/linear/dynamic/ntk/yarn, got {kind!r}")
            if kind != "default":
                need(float(self.rope_scaling.get("factor", 0)) >= 1.0,
                     f"rope_scaling['factor'] must be >= 1, got {self.rope_scaling.get('factor')}")

        # ---- experts
        need(self.n_routed_experts >= 0, f"n_routed_experts must be >= 0, got {self.n_routed_experts}")
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        need(self.n_zero_experts >= 0, f"n_zero_experts must be >= 0, got {self.n_zero_experts}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
             f"got {self.first_k_dense_replace}")
        if self.is_moe:
            total = self.n_routed_experts + self.n_zero_experts
            need(self.moe_intermediate_size > 0,
                 f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
            need(1 <= self.num_experts_per_tok <= total,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, "
                 f"n_routed_experts + n_zero_experts = {total}]")
            need(self.n_group >= 1, f"n_group must be >= 1, got {self.n_group}")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
            need(total % self.n_group == 0,
                 f"n_routed_experts + n_zero_experts ({total}) must be divisible by n_group "
                 f"({self.n_group})")
            if self.n_group > 1:
                need(self.topk_method != "greedy",
                     "n_group > 1 needs topk_method 'group_limited_greedy' or 'noaux_tc', not 'greedy'")
                per_group = total // self.n_group
                if self.topk_method == "noaux_tc":
                    need(per_group >= 2, "topk_method='noaux_tc' scores a group by its top-2 "
                         f"experts: each group needs >= 2 experts, got {per_group}")
                need(self.topk_group * per_group >= self.num_experts_per_tok,
                     f"topk_group ({self.topk_group}) groups of {per_group} experts hold fewer "
                     f"than num_experts_per_tok ({self.num_experts_per_tok}) experts")
            need(self.routed_scaling_factor > 0,
                 f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
            if self.capacity_factor is not None:
                need(self.capacity_factor > 0,
                     f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        else:
            need(self.intermediate_size > 0, "a dense model (n_routed_experts=0) needs "
                 f"intermediate_size > 0, got {self.intermediate_size}")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size > 0,
                 f"first_k_dense_replace={self.first_k_dense_replace} dense layers need "
                 f"intermediate_size > 0, got {self.intermediate_size}")
        for name in ("aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_coef", "bias_update_rate",
                     "mtp_loss_weight"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")

    # ---- derived quantities ------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_index: int) -> bool:
        """DeepSeek convention: the first first_k_dense_replace layers use a dense FFN."""
        return self.is_moe and layer_index >= self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head (MLA: nope + rope parts)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def rotary_dim(self) -> int:
        """How many dims of each head rotate (MLA: the decoupled rope part)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    # ---- construction ------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        rederive = {name: None for name in self._derived_fields if name not in changes}
        return dataclasses.replace(self, **{**rederive, **changes})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration; see PRESETS for the list."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        values.setdefault("name", name)
        return cls(**values)

    @classmethod
    def from_hf(cls, path_or_dict: Any) -> "ModelConfig":
        """Map a Hugging Face config.json (a path, a folder or a dict) to a ModelConfig."""
        if isinstance(path_or_dict, (str, os.PathLike)):
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as handle:
                hf = json.load(handle)
        elif isinstance(path_or_dict, dict):
            hf = dict(path_or_dict)
        else:
            raise TypeError(f"from_hf expects a path or a dict, got {type(path_or_dict).__name__}")
        return _from_hf_dict(hf)


HF_MLA_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
HF_GQA_MODEL_TYPES = ("qwen3_moe", "mixtral", "olmoe", "glm4_moe")
HF_OTHER_MODEL_TYPES = ("longcat_flash", "bailing_moe_v2")


def _from_hf_dict(hf: dict) -> ModelConfig:
    """Dispatch on model_type: the DeepSeek (MLA) families, the GQA families, LongCat-Flash."""
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type in HF_GQA_MODEL_TYPES:
        return _from_hf_gqa(hf, model_type)
    if model_type == "longcat_flash":
        return _from_hf_longcat(hf)
    if model_type == "bailing_moe_v2":
        return _from_hf_ling(hf)
    if model_type not in HF_MLA_MODEL_TYPES:
        raise ValueError(
            f"from_hf: model_type {model_type!r} is not mapped; known: "
            f"{', '.join(HF_MLA_MODEL_TYPES + HF_GQA_MODEL_TYPES + HF_OTHER_MODEL_TYPES)}"
        )
    return _from_hf_mla(hf, model_type)


def _from_hf_ling(hf: dict) -> ModelConfig:
    """Ling-2.0 (model_type bailing_moe_v2; inclusionAI's configuration_bailing_moe_v2.py).

    GQA with per-head QK-norm (use_qk_norm) and partial rotary (partial_rotary_factor, or
    Ling-1T's rotary_dim), a sigmoid router with a selection bias (expert_bias, when
    moe_router_enable_expert_bias), groups scored by their top-2 sum, renormalised gates times
    routed_scaling_factor (the gate renormalises whenever top-k > 1; the config's
    norm_topk_prob is not read by the modeling code), num_shared_experts shared experts of
    width moe_intermediate_size, the first first_k_dense_replace layers dense. Key names: num_experts, num_shared_experts,
    score_function, use_qkv_bias (q/k/v bias), use_bias (o_proj bias: refused).
    """
    get = hf.get

    def reject(key: str, why: str) -> None:
        raise ValueError(f"from_hf(bailing_moe_v2): {key}={get(key)!r} {why}; minimoe does not "
                         "implement it, so the model would compute a different function")

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
    heads = hf["num_attention_heads"]
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hf["hidden_size"] // heads
    partial = get("partial_rotary_factor", 1.0) or 1.0
    if get("rotary_dim"):
        partial = get("rotary_dim") / head_dim
    expert_width = get("moe_intermediate_size")
    shared = get("num_shared_experts") or 0
    shared_width = get("moe_shared_expert_intermediate_size")
    if shared and shared_width not in (None, shared * expert_width):
        reject("moe_shared_expert_intermediate_size",
               f"differs from num_shared_experts * moe_intermediate_size = {shared * expert_width}")
    values = dict(
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
        num_experts_per_tok=get("num_experts_per_tok") or 1,
        moe_intermediate_size=expert_width or 1,
        n_shared_experts=shared,
        first_k_dense_replace=get("first_k_dense_replace", 0) or 0,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=get("n_group") or 1,
        topk_group=get("topk_group") or 1,
        # BailingMoeV2Gate renormalises whenever top_k > 1, whatever norm_topk_prob says
        norm_topk_prob=(get("num_experts_per_tok") or 1) > 1,
        routed_scaling_factor=get("routed_scaling_factor", 1.0),
        use_expert_bias=get("moe_router_enable_expert_bias", True),
        num_nextn_predict_layers=get("num_nextn_predict_layers", 0) or 0,
    )
    return ModelConfig(**values)


def _from_hf_longcat(hf: dict) -> ModelConfig:
    """LongCat-Flash (transformers LongcatFlashConfig and the hub's config.json).

    Its own key names: num_layers (each layer = two MLA sublayers, so transformers'
    num_hidden_layers is 2 * num_layers), ffn_hidden_size (the dense FFNs),
    expert_ffn_hidden_size, moe_topk, zero_expert_num (identity experts). The router is a
    softmax over all n_routed_experts + zero_expert_num logits, top-k on the scores plus the
    selection bias e_score_correction_bias, gates = unrenormalised scores * routed_scaling_factor
    (identity experts included); every layer has the shortcut MoE, no shared experts. The
    MLA latent scales are always on in transformers; the hub's config.json spells them out
    (mla_scale_q_lora / mla_scale_kv_lora). RoPE rotates head_dim (= qk_rope_head_dim) dims.
    The checkpoint's one MTP module (model.mtp.*) is not counted in config.json (transformers
    builds none): num_nextn_predict_layers is the config's value when it has one (0 or 1),
    else 0, and ``load_pretrained`` sets it to 1 when the checkpoint holds model.mtp.* tensors.
    """
    get = hf.get

    def reject(key: str, why: str) -> None:
        raise ValueError(f"from_hf(longcat_flash): {key}={get(key)!r} {why}; minimoe does not "
                         "implement it, so the model would compute a different function")

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
    rope_theta, rope_scaling = get("rope_theta", 10000000.0), get("rope_scaling")
    if isinstance(get("rope_parameters"), dict):
        parameters = dict(hf["rope_parameters"])
        rope_theta = parameters.pop("rope_theta", rope_theta)
        kind = parameters.get("rope_type", parameters.get("type", "default"))
        rope_scaling = parameters if kind not in (None, "default") else None
    num_layers = get("num_layers") or hf["num_hidden_layers"] // 2
    values = dict(
        name=get("_name_or_path", "longcat_flash") or "longcat_flash",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=num_layers,
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
        n_shared_experts=0,
        first_k_dense_replace=0,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=get("routed_scaling_factor", 6.0),
        use_expert_bias=True,
        shortcut_moe=True,
        num_nextn_predict_layers=get("num_nextn_predict_layers") or 0,
    )
    return ModelConfig(**values)


def _from_hf_gqa(hf: dict, model_type: str) -> ModelConfig:
    """Qwen3-MoE, Mixtral, OLMoE and GLM-4.5 (glm4_moe): grouped-query attention + MoE FFN.

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

    All four rotate in the rotate-half layout (their ``rotate_half``), minimoe's own, so no
    rows are permuted on load. A key that would make the checkpoint compute something minimoe
    does not (sliding-window attention, clipped q/k/v, an o_proj bias, a layer pattern other
    than "the first k layers dense", an activation other than SiLU) raises ValueError naming
    the key. Keys that only affect training (router_jitter_noise, the dropouts) are ignored.
    """
    get = hf.get

    def reject(key: str, why: str) -> None:
        raise ValueError(f"from_hf({model_type}): {key}={get(key)!r} {why}; minimoe does not "
                         "implement it, so the model would compute a different function")

    if get("hidden_act", "silu") != "silu":
        reject("hidden_act", "is not SwiGLU's silu")
    # rope: transformers >= 5 writes rope_parameters; older and published configs rope_theta,
    # rope_scaling and (GLM-4.5) partial_rotary_factor at the top level
    parameters = dict(get("rope_parameters") or {})
    rope_theta = parameters.pop("rope_theta", get("rope_theta", 1e6 if model_type == "mixtral"
                                                  else 10000.0))
    partial = parameters.pop("partial_rotary_factor", get("partial_rotary_factor"))
    if partial is None:
        partial = 0.5 if model_type == "glm4_moe" else 1.0  # the classes' defaults
    if partial != 1.0 and model_type != "glm4_moe":
        reject("partial_rotary_factor", f"is {partial}, but {model_type} rotates whole heads")
    rope_scaling = parameters or get("rope_scaling")
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        rope_scaling = None
    elif kind not in ("linear", "dynamic", "yarn"):
        raise ValueError(f"from_hf({model_type}): rope type {kind!r} (rope_parameters / "
                         "rope_scaling) is not implemented by minimoe.rope")

    num_layers = hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hf["hidden_size"] // heads
    experts = get("n_routed_experts") or get("num_experts") or get("num_local_experts") or 0

    # which layers are MoE: minimoe's rule is "all but the first first_k_dense_replace"
    first_dense = get("first_k_dense_replace", 0) or 0
    if model_type == "qwen3_moe":
        mlp_only = set(get("mlp_only_layers") or [])
        step = get("decoder_sparse_step", 1) or 1
        sparse = [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
        first_dense = num_layers - len(sparse)
        if experts and sparse != list(range(first_dense, num_layers)):
            key = "mlp_only_layers" if step == 1 else "decoder_sparse_step"
            reject(key, f"makes layers {sparse} sparse, not a dense prefix then all MoE")
        if get("shared_expert_intermediate_size"):
            reject("shared_expert_intermediate_size", "asks for a Qwen2-MoE-style gated "
                   "shared expert")
    # sliding-window attention
    if model_type == "qwen3_moe":
        if get("use_sliding_window") and get("sliding_window") is not None:
            reject("use_sliding_window", f"with sliding_window={get('sliding_window')}")
    elif get("sliding_window") is not None:
        reject("sliding_window", "is set (sliding-window attention)")
    if get("clip_qkv") is not None:
        reject("clip_qkv", "clamps q, k and v")
    # keys of related families / newer configs that would change the layer pattern or router
    if any(kind != "full_attention" for kind in get("layer_types") or []):
        reject("layer_types", "mixes attention kinds")
    mlp_types = get("mlp_layer_types")
    if mlp_types is not None and list(mlp_types) != (
            ["dense"] * first_dense + ["sparse"] * (num_layers - first_dense)):
        reject("mlp_layer_types", f"is not {first_dense} dense layers then sparse ones")
    if (get("moe_layer_freq", 1) or 1) != 1:
        reject("moe_layer_freq", "makes only some layers MoE")
    if model_type == "glm4_moe":
        if get("scoring_func", "sigmoid") != "sigmoid":
            reject("scoring_func", "is not GLM-4.5's sigmoid")
        if get("topk_method", "noaux_tc") != "noaux_tc":
            reject("topk_method", "is not GLM-4.5's noaux_tc")
    attention_bias = bool(get("attention_bias", False))
    if attention_bias and model_type in ("qwen3_moe", "olmoe"):
        reject("attention_bias", "puts a bias on o_proj too (minimoe: q/k/v only)")
    if model_type == "mixtral":
        attention_bias = False  # MixtralAttention has no bias, whatever the key says
    qk_norm = {"qwen3_moe": "per_head", "olmoe": "full", "mixtral": "none",
               "glm4_moe": "per_head" if get("use_qk_norm", False) else "none"}[model_type]

    expert_width = get("moe_intermediate_size") or hf["intermediate_size"]
    glm = model_type == "glm4_moe"
    values = dict(
        name=get("_name_or_path", model_type) or model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=get("max_position_embeddings", 4096),
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_word_embeddings=get("tie_word_embeddings", False),
        attention="gqa" if kv_heads < heads else "mha",
        attention_bias=attention_bias,
        qk_norm=qk_norm,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        partial_rotary_factor=partial,
        n_routed_experts=experts,
        num_experts_per_tok=get("num_experts_per_tok") or 1,
        moe_intermediate_size=expert_width,
        n_shared_experts=(get("n_shared_experts", 1) or 0) if glm else 0,
        first_k_dense_replace=first_dense,
        scoring_func="sigmoid" if glm else "softmax",
        topk_method="noaux_tc" if glm else "greedy",
        n_group=(get("n_group") or 1) if glm else 1,
        topk_group=(get("topk_group") or 1) if glm else 1,
        norm_topk_prob=True if model_type == "mixtral" else
        bool(get("norm_topk_prob", glm)),
        routed_scaling_factor=get("routed_scaling_factor", 1.0) if glm else 1.0,
        use_expert_bias=glm,
        aux_loss_alpha=0.0 if glm else get("router_aux_loss_coef", 0.0),
        num_nextn_predict_layers=(get("num_nextn_predict_layers", 0) or 0) if glm else 0,
    )
    return ModelConfig(**values)


def _from_hf_mla(hf: dict, model_type: str) -> ModelConfig:
    """The DeepSeek-V3 / V2 / Kimi-K2 mapping (Multi-head Latent Attention)."""
    get = hf.get
    # transformers >= 5 writes rope_parameters = {"rope_type", "rope_theta", scaling keys...}
    # instead of rope_theta + rope_scaling; older configs (and DeepSeek's own) use the latter.
    rope_theta, rope_scaling = get("rope_theta", 10000.0), get("rope_scaling")
    if isinstance(get("rope_parameters"), dict):
        parameters = dict(hf["rope_parameters"])
        rope_theta = parameters.pop("rope_theta", rope_theta)
        kind = parameters.get("rope_type", parameters.get("type", "default"))
        rope_scaling = parameters if kind not in (None, "default") else None
    # The DeepSeek-V3 modeling code (DeepSeek's and transformers') always routes with sigmoid
    # scores, a selection bias and top-2-sum group scores; transformers' config.json omits
    # these keys, DeepSeek's spells them out.
    v3 = model_type != "deepseek_v2"
    topk_method = get("topk_method", "noaux_tc" if v3 else "greedy")
    values = dict(
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
        n_group=get("n_group") or 1,
        topk_group=get("topk_group") or 1,
        norm_topk_prob=get("norm_topk_prob", model_type != "deepseek_v2"),
        routed_scaling_factor=get("routed_scaling_factor", 1.0),
        use_expert_bias=topk_method == "noaux_tc",
        aux_loss_alpha=get("aux_loss_alpha", 0.0) if not get("seq_aux", False) else 0.0,
        seq_aux_loss_alpha=get("aux_loss_alpha", 0.0) if get("seq_aux", False) else 0.0,
        num_nextn_predict_layers=get("num_nextn_predict_layers", 0),
    )
    if values["n_group"] > 1 and values["topk_method"] == "greedy":
        values["topk_method"] = "group_limited_greedy"
    return ModelConfig(**values)


# ----------------------------------------------------------------------------------------------
# Presets. Published models: dimensions from their public config.json files.
# ----------------------------------------------------------------------------------------------

_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

_TOY = dict(
    vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=384, max_position_embeddings=1024,
    attention="mla", q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
    n_shared_experts=1, first_k_dense_replace=1,
    scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
    norm_topk_prob=True, routed_scaling_factor=1.0, use_expert_bias=True,
    bias_update_rate=1e-3, seq_aux_loss_alpha=1e-4,
    num_nextn_predict_layers=1, mtp_loss_weight=0.3,
)

PRESETS: dict[str, dict] = {
    # --- small trainable models: the toy and its twins, written as differences from it -----
    # DeepSeek-V3 in miniature: MLA, sigmoid router + selection-only expert bias, group-limited
    # routing, one shared expert, one dense first layer, one MTP module.
    "toy": _TOY,
    # The classic recipe for comparison: softmax router, top-k, Switch/GShard auxiliary loss.
    "toy-classic": {**_TOY, **dict(
        scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, use_expert_bias=False, bias_update_rate=0.0,
        seq_aux_loss_alpha=0.0, aux_loss_alpha=1e-2,
    )},
    # Grouped-query attention instead of MLA (Ling-2.0 style: QK-norm, partial RoPE).
    "toy-gqa": {**_TOY, **dict(
        attention="gqa", num_key_value_heads=2, qk_norm="per_head", partial_rotary_factor=0.5,
        seq_aux_loss_alpha=0.0,
    )},
    # A dense twin with the same *activated* FFN width per token in the MoE layers:
    # shared (64) + top-2 routed (2 x 64) = 192.
    "toy-dense": {**_TOY, **dict(
        intermediate_size=192, n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0,
        use_expert_bias=False, bias_update_rate=0.0, seq_aux_loss_alpha=0.0,
    )},
    # --- published models --------------------------------------------------------------------
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, intermediate_size=18432, max_position_embeddings=163840,
        attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, rope_scaling=dict(_YARN_V3),
        n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048,
        n_shared_experts=1, first_k_dense_replace=3, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, use_expert_bias=True, bias_update_rate=1e-3,
        # 1e-4 is the report's value (§4.2); config.json carries aux_loss_alpha 0.001 (with
        # seq_aux true), a field no inference code reads.
        seq_aux_loss_alpha=1e-4, num_nextn_predict_layers=1, mtp_loss_weight=0.3,
    ),
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, intermediate_size=10944, max_position_embeddings=163840,
        attention="mla", q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
        n_shared_experts=2, first_k_dense_replace=1, scoring_func="softmax",
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, use_expert_bias=False, seq_aux_loss_alpha=1e-3,
    ),
    "ling-mini-2.0": dict(
        vocab_size=157184, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
        num_key_value_heads=4, head_dim=128, intermediate_size=5120,
        max_position_embeddings=32768, attention="gqa", qk_norm="per_head",
        partial_rotary_factor=0.5, rope_theta=600000.0,
        n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, use_expert_bias=True, bias_update_rate=1e-3,
        # Trained with one MTP layer (loss weight 0.1, Ling-V2 pretraining scripts); the released
        # Ling-mini-2.0 checkpoint ships none (16.26B = the count without MTP; Ling-V2 README:
        # "MTP is supported for base model, and not yet for chat model").
        z_loss_coef=3.5e-6, num_nextn_predict_layers=0, mtp_loss_weight=0.1,
    ),
    "ling-flash-2.0": dict(
        vocab_size=157184, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=9216,
        max_position_embeddings=32768, attention="gqa", qk_norm="per_head",
        partial_rotary_factor=0.5, rope_theta=600000.0,
        n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
        n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, use_expert_bias=True, bias_update_rate=1e-3,
        # As Ling-mini: trained with one MTP layer, none in the released checkpoint (the hub's
        # safetensors count, 102,889,705,216, equals the count without MTP exactly).
        z_loss_coef=3.5e-6, num_nextn_predict_layers=0, mtp_loss_weight=0.1,
    ),
    "longcat-flash": dict(
        # config.json names: num_layers 28, ffn_hidden_size 12288, expert_ffn_hidden_size 2048,
        # zero_expert_num 256, moe_topk 12. Each of the 28 layers holds two MLA sublayers, two
        # dense FFNs and one shortcut-connected MoE (shortcut_moe=True).
        vocab_size=131072, hidden_size=6144, num_hidden_layers=28, num_attention_heads=64,
        num_key_value_heads=64, intermediate_size=12288, max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000000.0,
        mla_scale_q_lora=True, mla_scale_kv_lora=True,
        n_routed_experts=512, n_zero_experts=256, num_experts_per_tok=12,
        moe_intermediate_size=2048, n_shared_experts=0, first_k_dense_replace=0,
        scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=6.0, use_expert_bias=True,
        # The checkpoint holds one MTP module (model.mtp.*: enorm, hnorm, eh_proj, one MLA +
        # dense-FFN layer, a final norm), which transformers skips on load and
        # minimoe.load_pretrained loads.
        shortcut_moe=True, num_nextn_predict_layers=1,
    ),
    "mixtral-8x7b": dict(
        vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        max_position_embeddings=32768, rms_norm_eps=1e-5, attention="gqa", rope_theta=1000000.0,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
        n_shared_experts=0, first_k_dense_replace=0, scoring_func="softmax",
        topk_method="greedy", norm_topk_prob=True, use_expert_bias=False,
        aux_loss_alpha=0.02,
    ),
    "qwen3-30b-a3b": dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144,
        max_position_embeddings=40960, attention="gqa", qk_norm="per_head",
        rope_theta=1000000.0, n_routed_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, n_shared_experts=0, first_k_dense_replace=0,
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=True,
        use_expert_bias=False, aux_loss_alpha=1e-3,
    ),
    "olmoe-1b-7b": dict(
        vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, intermediate_size=1024, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        attention="mha", qk_norm="full", rope_theta=10000.0,
        n_routed_experts=64, num_experts_per_tok=8, moe_intermediate_size=1024,
        n_shared_experts=0, first_k_dense_replace=0, scoring_func="softmax",
        topk_method="greedy", norm_topk_prob=False, use_expert_bias=False,
        aux_loss_alpha=1e-2, z_loss_coef=1e-3,
    ),
}
