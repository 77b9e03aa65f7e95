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
* MTP: num_nextn_predict_layers modules, weighted by mtp_loss_weight (DeepSeek-V3 §2.2),
  fed the main model's last hidden state after (mtp_input "post_norm") or before
  ("pre_norm") its final RMSNorm (``minimoe.mtp`` cites what each runtime does).

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
MTP_INPUTS = ("post_norm", "pre_norm")
DISPATCH_KINDS = ("naive", "sorted", "gather")
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
    # Which state of the main model feeds MTP module 1 (and of module k, module k+1):
    # "post_norm" = after the final RMSNorm (model.norm; module k's own final norm), what every
    # runtime serving released MTP weights does (vLLM, SGLang, Megatron-LM, Ling's own code);
    # "pre_norm" = the residual stream before it. See minimoe.mtp for the sources.
    mtp_input: str = "post_norm"

    # ---- LongCat-Flash block shape (shortcut-connected MoE: minimoe.block.ShortcutDecoderLayer) -
    shortcut_moe: bool = False

    # ---- execution choices (do not change the function, only how it is computed) ---------
    # "naive" per-expert loop | "sorted" grouped matmul | "gather" per-slot weights (decoding)
    dispatch: str = "sorted"
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
        self._validate_kinds()
        self._validate_attention()
        self._validate_positions()
        self._validate_experts()
        for name in ("aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_coef", "bias_update_rate",
                     "mtp_loss_weight"):
            self._need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        self._need(self.num_nextn_predict_layers >= 0,
                   f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        self._need(self.mtp_input in MTP_INPUTS,
                   f"mtp_input must be one of {MTP_INPUTS}, got {self.mtp_input!r}")

    def _need(self, condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"ModelConfig({self.name}): {message}")

    def _validate_kinds(self) -> None:
        """Sizes are positive; every string field is one of its known values."""
        need = self._need
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

    def _validate_attention(self) -> None:
        need = self._need
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

    def _validate_positions(self) -> None:
        need = self._need
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

    def _validate_experts(self) -> None:
        need = self._need
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
        """A ModelConfig from ``to_dict``'s output (a minimoe checkpoint's config.json)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        # configs saved before mtp_input existed trained their MTP modules on the pre-norm state
        return cls(**{"mtp_input": "pre_norm", **values})

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
        """Map a Hugging Face config.json (a path, a folder or a dict) to a ModelConfig.

        The mapping of each model_type lives with its checkpoint family
        (``minimoe.checkpoints.families``: DeepSeek-V3/V2, Qwen3-MoE, Mixtral, OLMoE, GLM-4.5,
        LongCat-Flash, Ling-2.0), beside the tensor names of the same checkpoints.
        """
        from minimoe.checkpoints.families import config_values  # the families import no config

        where = "config"
        if isinstance(path_or_dict, (str, os.PathLike)):
            where = os.fspath(path_or_dict)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            if not os.path.exists(where):
                raise FileNotFoundError(f"no config.json at {where}")
            with open(where) as handle:
                try:
                    hf = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where} is not valid JSON: {error}") from error
        elif isinstance(path_or_dict, dict):
            hf = dict(path_or_dict)
        else:
            raise TypeError(f"from_hf expects a path or a dict, got {type(path_or_dict).__name__}")
        return cls(**config_values(hf, where))


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
