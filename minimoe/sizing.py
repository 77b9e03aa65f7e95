"""Sizing: parameter counts, FLOPs per token, KV-cache bytes, and why publishers disagree.

Every MoE model card quotes two numbers, "total" and "activated" parameters, and those two
numbers decide almost everything an engineer plans: total parameters decide the memory to
*hold* the model (and the GPUs to shard it over), activated parameters decide the compute to
*run* it (FLOPs per token, hence training cost and decode speed). This module counts both
from a ``ModelConfig`` alone, component by component, and then reproduces each publisher's
headline numbers -- which takes more care than one would think, because publishers do not
count the same things.

Notation: C = hidden_size, L = num_hidden_layers, V = vocab_size, H = query heads,
H_kv = key/value heads, D = head_dim, I = intermediate_size (dense FFN),
I_e = moe_intermediate_size (one expert), E = n_routed_experts, Z = n_zero_experts,
k = num_experts_per_tok, S = n_shared_experts. All weights are matrices without biases
unless a config says otherwise (none of the published presets has projection biases).

What is counted
---------------
**Embedding and head.** The input embedding is a (V, C) table; the output head ("lm_head")
is another (V, C) matrix unless ``tie_word_embeddings`` makes them one tensor (then the
head adds 0). With V = 129,280 and C = 7,168 each is 0.93B parameters in DeepSeek-V3.

**Attention, per layer.**

* MHA / GQA:  q: C*H*D,  k and v: C*H_kv*D each,  o: H*D*C.  GQA shrinks only k and v
  (Mixtral: H = 32, H_kv = 8). QK-norm adds 2*D ("per_head", Qwen3 / Ling-2.0: one RMSNorm
  weight of width D shared by all heads) or H*D + H_kv*D ("full", OLMoE: the whole
  projected q and k vectors are normalised).
* MLA (DeepSeek-V2 §2.1): the query goes through a low-rank bottleneck,
  q_a_proj C*q_lora -> q_a_layernorm q_lora -> q_b_proj q_lora*H*(d_nope + d_rope)
  (or one q_proj C*H*(d_nope + d_rope) when q_lora_rank is None, as in V2-Lite);
  keys and values share one latent: kv_a_proj_with_mqa C*(kv_lora + d_rope) ->
  kv_a_layernorm kv_lora -> kv_b_proj kv_lora*H*(d_nope + d_v); then o_proj H*d_v*C.
  For V3: 11.0M + 37.7M + 4.1M + 16.8M + 117.4M = 187M per layer; o_proj dominates.
  The two latent RMSNorms (and QK-norms above) are counted under "attention" because they
  live inside the attention module.

**FFNs.** A SwiGLU FFN of width I has three matrices, gate and up (C -> I) and down
(I -> C): 3*C*I. Dense layers use I = intermediate_size; every routed or shared expert is a
SwiGLU of width I_e: 3*C*I_e. (Ling-2.0's config names the shared width separately,
moe_shared_expert_intermediate_size; for Ling-mini/flash it equals I_e = 512 / 1024, so
S = 1 shared expert of width I_e is exact.)

**Router.** The gate is a (E + Z, C) matrix, E*C without zero experts: one logit per expert.
The selection-only expert bias of aux-loss-free balancing (``e_score_correction_bias``,
Ling's ``expert_bias``) adds E + Z numbers; it is not trained by gradients, but it is part
of the checkpoint and every hub count includes it (Ling-flash-2.0's safetensors header lists
exactly 31 * 256 = 7,936 float32 numbers: those biases). Noisy top-k gating
(Shazeer et al. 2017) would add a second (E + Z, C) noise matrix W_noise.

**Norms.** Two RMSNorms of width C per block (before attention, before the FFN) and one
final norm: (2L + 1)*C. Negligible (V3: 0.9M), but counted so that totals are exact.

**MTP** (DeepSeek-V3 §2.2). Each of the num_nextn_predict_layers modules holds enorm and
hnorm (C each), eh_proj (2C -> C: 2*C*C), one full decoder block (in V3 an MoE block, like
layer 61 of the checkpoint) and a final norm (shared_head.norm); the embedding and output
head are *shared* with the main model and not counted again. LongCat-Flash's MTP block is a
single MLA sublayer plus one dense FFN of width I (model.mtp.* in its checkpoint).

**LongCat-Flash's block** (``shortcut_moe``; LongCat-Flash report §2): each of its 28
layers holds TWO MLA sublayers and TWO dense SwiGLU FFNs of width I = 12,288, plus ONE MoE
whose input is taken after the first attention and whose output joins the residual stream
at the end of the layer (the "shortcut"), so the MoE's all-to-all can overlap the dense
compute. Its 768 router outputs cover 512 FFN experts and 256 zero-computation experts.

Total and active
----------------
``total`` adds everything. ``active`` is what one token touches: everything except the
routed experts it did not pick, i.e. total - sum over MoE layers of (E - k_ffn) * 3*C*I_e,
with k_ffn = k routed FFN experts per MoE layer. The router and the shared experts run for
every token, so they are active. By the common convention the whole embedding table counts
as active when it is counted at all (a token reads only one row of it, but a row of a table
you must keep in memory is not what "activated" is about: the convention follows compute,
and the head's V*C matmul is real compute).

Zero-computation experts make "active" a range. LongCat-Flash routes each token to k = 12
of 512 FFN experts + 256 identity experts; an identity expert returns its input (scaled by
its gate) and costs nothing. A token that picks z identity experts runs 12 - z FFN experts,
so per MoE layer it activates between max(0, k - Z) = 0 and min(k, E) = 12 experts:
``active_min`` and ``active_max`` (= ``active``). If the router spreads tokens evenly over
all E + Z experts -- which its load-balancing bias aims for -- the expected number of FFN
experts is k * E / (E + Z) = 12 * 512 / 768 = 8: ``active_expected``. Leaving out the
input embedding as LongCat does, that reproduces the report's figures: 18.7B with no FFN
expert, 31.4B with twelve, 27.1B with eight -- the report gives "18.6B-31.3B (~27B on
average)".

Why publishers' numbers differ (``PUBLISHED``, ``published_counts``)
--------------------------------------------------------------------
1. **Is the input embedding "active"?** DeepSeek counts the output head but not the input
   embedding among activated parameters: V3's README_WEIGHTS.md gives "36.6B (including
   0.9B for the output Head)", which the report rounds to "37B". LongCat-Flash's 18.6B-31.3B
   also leaves one V*C table out. Mistral (12.9B), Qwen (3.3B), AI2 (OLMoE 1.3B) and
   inclusionAI (Ling 1.43B / 6.1B) include both tables. The gap is 2*V*C/active: 0.9B of
   37B is small, but Ling-mini's 0.64B of embedding and head is 45% of its 1.43B.
2. **What is "non-embedding"?** Ling's "789M non-embedding" and Qwen3's "29.9B
   non-embedding" remove BOTH the embedding and the head; Kaplan et al. (2020) excluded
   only the embedding (and positional embeddings). minimoe's ``active_non_embedding``
   removes only the input embedding -- the head is a matmul every token pays for -- and
   ``published_counts`` applies each publisher's own rule.
3. **Is MTP in "total"?** DeepSeek-V3's 671B is the main model; its checkpoint on the hub
   (685B) also stores the MTP module: 11.6B of its own parameters plus copies of the 0.9B
   embedding and 0.9B head in layer 61 (671.0 + 11.6 + 1.9 = 684.5B, and FP8 scale tensors
   add ~0.04B more). README_WEIGHTS.md says "11.5B unique" for the MTP module and "1.5B"
   activated: both match our counts without eh_proj (0.1B), which it seems to leave out.
   Ling-2.0 trained with one MTP layer but released checkpoints without it (Ling-flash-2.0's
   hub count, 102,889,705,216, equals the count without MTP exactly).
   LongCat's checkpoint holds a 0.39B MTP module; 560B cannot tell whether it was counted.
4. **Rounding and marketing.** "100B" for Ling-flash's 102.9B; "37B" for 36.6B; DeepSeek-
   V2-Lite's "2.4B" is 2.45B under DeepSeek's own convention (2.1% off: it reads as 2.45
   truncated to one decimal; no convention we found lands within 2%).

FLOPs per token (``flops_per_token``)
------------------------------------
A matmul with a (n, m) weight costs 2*n*m FLOPs per token (one multiply and one add per
weight). So the forward pass costs 2 * N FLOPs per token, where N is the number of
*activated matmul parameters*: ``active_non_embedding`` (the embedding lookup is a gather,
not a matmul; the head is a matmul and stays in). Norms and the router are elementwise or
tiny and are left in N for simplicity. For zero-expert configs N uses ``active_expected``.

On top of the weights comes attention itself, which has no parameters: per attention
sublayer and per token, the scores q.k cost 2 * n_keys * H * d_qk and the weighted sum of
values 2 * n_keys * H * d_v. Convention used here: ``context_length`` T is the length of a
causal training (or prefill) sequence, and we return the *average* per token, so a token
attends to n_keys = T/2 keys on average:

    forward FLOPs / token = 2 * N_active + n_attn_layers * T * H * (d_qk + d_v)

For MHA/GQA (d_qk = d_v = D) the attention term is 2 * n_layers * T * d_attn with
d_attn = H*D: exactly Kaplan et al. (2020, Table 1)'s "2 n_layer n_ctx d_attn". (A decoded
token at position T attends to all T keys: call with context_length = 2T.) MLA is counted in
its training form (keys and values expanded per head; d_qk = 192, d_v = 128 for V3); the
weight-absorbed decode form trades these FLOPs differently.

Training costs about three forward passes (backward = 2x forward: gradients with respect
to activations and to weights), which gives the Kaplan/Chinchilla rule C = 6 * N * D tokens
with N = activated parameters, plus 3x the attention term. When training, the MTP modules
run too (their block, eh_proj and one more pass through the shared head), so
``training=True`` includes them by default.

KV cache (``kv_cache_bytes_per_token``)
---------------------------------------
Per token and per attention sublayer, MHA/GQA caches a key and a value per KV head:
2 * H_kv * D numbers. MLA caches only the compressed latent and the shared rotary key:
kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576 numbers. Over V3's 61 layers in bf16:
576 * 61 * 2 = 70,272 bytes, 68.6 KiB per token, where MHA with the same 128 heads of 128
would need 2 * 128 * 128 * 61 * 2 = 4.0 MB. LongCat-Flash has two attention sublayers per
layer: 56 latents. MTP modules are not counted (speculative decoding keeps a separate
small cache).

``kv_cache_bytes_per_token(cfg, kind=...)`` and ``kv_cache_variants(cfg)`` answer "what if
this model cached like MHA / GQA / MQA / MLA?" with the same heads and layers, the
comparison of DeepSeek-V2 §2.1.4 Table 1 (MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l,
MLA (d_c + d_h^R) l ~ 4.5 d_h l). For MLA configs the MHA variant is what decompressed
MLA would cache, H * (qk_head_dim + v_head_dim) = 40,960 numbers per layer for V3.

Sources: DeepSeek-V3 Technical Report (arXiv:2412.19437) §1, §2.2, §3.1, §4.2 and
README_WEIGHTS.md in deepseek-ai/DeepSeek-V3; DeepSeek-V2 report (arXiv:2405.04434);
LongCat-Flash Technical Report (arXiv:2509.01322) and the transformers LongcatFlash model;
inclusionAI Ling-V2 README and the Ling-mini-2.0 / Ling-flash-2.0 model cards; "Mixtral of
Experts" (arXiv:2401.04088) and Mistral's release post; the Qwen3-30B-A3B model card; OLMoE
(arXiv:2409.02060); Kaplan et al., "Scaling Laws for Neural Language Models" (2020);
Hoffmann et al., "Training Compute-Optimal Large Language Models" (2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from minimoe.config import PRESETS, ModelConfig

COMPONENTS = (
    "embedding", "lm_head", "attention", "dense_ffn", "routed_experts", "shared_experts",
    "router", "norms", "mtp",
)


# ----------------------------------------------------------------------------------------------
# Building blocks (parameters of one module)
# ----------------------------------------------------------------------------------------------
def attention_params(cfg: ModelConfig) -> int:
    """Parameters of ONE attention sublayer (projections, their biases, MLA/QK norms)."""
    C, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention == "mla":
        d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # compressed kv + shared rope key
        if cfg.q_lora_rank is None:
            q = C * H * d_qk  # q_proj (H*d_qk, C)
        else:
            q = C * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * d_qk
            #   q_a_proj           + q_a_layernorm   + q_b_proj
        kv = C * latent + cfg.kv_lora_rank + cfg.kv_lora_rank * H * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        #    kv_a_proj_with_mqa + kv_a_layernorm + kv_b_proj
        o = H * cfg.v_head_dim * C  # o_proj (C, H*d_v)
        bias = 0
        if cfg.attention_bias:  # as transformers' DeepseekV3: q_a, kv_a and o carry biases
            bias = (cfg.q_lora_rank or 0) + latent + C
        return q + kv + o + bias
    D, H_kv = cfg.head_dim, cfg.num_key_value_heads
    q, k, v, o = C * H * D, C * H_kv * D, C * H_kv * D, H * D * C
    bias = (H + 2 * H_kv) * D if cfg.attention_bias else 0  # q/k/v biases (Qwen2, GLM-4.5)
    if cfg.qk_norm == "per_head":
        qk_norm = 2 * D
    elif cfg.qk_norm == "full":
        qk_norm = H * D + H_kv * D
    else:
        qk_norm = 0
    return q + k + v + o + bias + qk_norm


def swiglu_params(hidden_size: int, intermediate_size: int) -> int:
    """gate (C -> I), up (C -> I), down (I -> C): 3*C*I."""
    return 3 * hidden_size * intermediate_size


def expert_params(cfg: ModelConfig) -> int:
    """One routed (or shared) expert: a SwiGLU of width moe_intermediate_size."""
    return swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size)


def router_params(cfg: ModelConfig) -> int:
    """Gate (E+Z, C), plus the selection-only bias (E+Z), plus W_noise for noisy gating."""
    n = cfg.n_routed_experts + cfg.n_zero_experts
    total = n * cfg.hidden_size
    if cfg.use_expert_bias:
        total += n
    if cfg.noisy_gating:
        total += n * cfg.hidden_size
    return total


def _moe_parts(cfg: ModelConfig) -> dict:
    """One MoE FFN split into routed experts, shared experts and router."""
    return {
        "routed_experts": cfg.n_routed_experts * expert_params(cfg),
        "shared_experts": cfg.n_shared_experts * expert_params(cfg),
        "router": router_params(cfg),
    }


def _ffn_experts_per_token(cfg: ModelConfig) -> tuple[int, int, float]:
    """(min, max, expected) routed FFN experts one token runs in one MoE layer.

    With Z zero-computation experts among the k picks, a token runs between max(0, k - Z)
    and min(k, E) FFN experts; if routing is uniform over all E + Z experts it runs
    k * E / (E + Z) on average.
    """
    E, Z, k = cfg.n_routed_experts, cfg.n_zero_experts, cfg.num_experts_per_tok
    return max(0, k - Z), min(k, E), k * E / (E + Z)


def _n_attention_sublayers(cfg: ModelConfig) -> int:
    return cfg.num_hidden_layers * (2 if cfg.shortcut_moe else 1)


# ----------------------------------------------------------------------------------------------
# count_params
# ----------------------------------------------------------------------------------------------
def count_params(cfg: ModelConfig, include_mtp: bool = True) -> dict:
    """Parameter counts of a minimoe model built from ``cfg``, by component.

    Returns a dict with the components "embedding" (input), "lm_head" (0 if tied),
    "attention", "dense_ffn", "routed_experts", "shared_experts", "router" (gate + bias),
    "norms", "mtp" (everything in the MTP modules except the shared embedding and head; 0
    when include_mtp is False), and the totals:

    * "total": the sum of the components;
    * "active": per token, everything except the routed experts a token did not pick
      (k routed FFN experts per MoE layer, MTP blocks included when include_mtp);
    * "active_non_embedding": active minus the input embedding;
    * "moe_layers": the number of MoE FFNs counted (MTP blocks included when include_mtp);
    * for configs with zero-computation experts also "active_min" (fewest FFN experts a
      token can run), "active_max" (= active) and "active_expected" (uniform routing over
      all E + Z experts).
    """
    C, V = cfg.hidden_size, cfg.vocab_size
    parts = dict.fromkeys(COMPONENTS, 0)
    parts["embedding"] = V * C  # (V, C) table
    parts["lm_head"] = 0 if cfg.tie_word_embeddings else V * C  # (V, C) matrix
    attn, dense = attention_params(cfg), swiglu_params(C, cfg.intermediate_size)
    moe = _moe_parts(cfg)
    moe_layers = 0

    for i in range(cfg.num_hidden_layers):
        if cfg.shortcut_moe:  # LongCat: 2 attention + 2 dense FFNs + 4 norms (+ 1 MoE)
            parts["attention"] += 2 * attn
            parts["dense_ffn"] += 2 * dense
            parts["norms"] += 4 * C
            if cfg.is_moe_layer(i):
                moe_layers += 1
                for name, n in moe.items():
                    parts[name] += n
        else:  # one pre-norm block: attention + (dense FFN or MoE)
            parts["attention"] += attn
            parts["norms"] += 2 * C
            if cfg.is_moe_layer(i):
                moe_layers += 1
                for name, n in moe.items():
                    parts[name] += n
            else:
                parts["dense_ffn"] += dense
    parts["norms"] += C  # final norm

    mtp_moe_layers = 0
    if include_mtp:
        for depth in range(1, cfg.num_nextn_predict_layers + 1):
            module = 2 * C + 2 * C * C + C  # enorm + hnorm, eh_proj (2C -> C), shared_head.norm
            module += attn + 2 * C  # the block's attention and its two norms
            if cfg.shortcut_moe:  # LongCat's MTP layer: one MLA + one dense FFN
                module += dense
            elif cfg.is_moe_layer(cfg.num_hidden_layers + depth - 1):
                module += sum(moe.values())
                mtp_moe_layers += 1
            else:
                module += dense
            parts["mtp"] += module

    total = sum(parts[name] for name in COMPONENTS)
    out = dict(parts)
    out["total"] = total
    out["moe_layers"] = moe_layers + mtp_moe_layers

    n_moe = moe_layers + mtp_moe_layers
    k_min, k_max, k_expected = _ffn_experts_per_token(cfg) if cfg.is_moe else (0, 0, 0.0)

    def unpicked(k: float) -> float:  # routed FFN experts a token skips, over all MoE FFNs
        return n_moe * (cfg.n_routed_experts - k) * expert_params(cfg)

    out["active"] = total - unpicked(k_max)
    out["active_non_embedding"] = out["active"] - parts["embedding"]
    if cfg.n_zero_experts > 0 and cfg.is_moe:
        out["active_min"] = total - unpicked(k_min)
        out["active_max"] = out["active"]
        out["active_expected"] = total - unpicked(k_expected)
    return out


def _active_matmul_params(cfg: ModelConfig, include_mtp: bool) -> float:
    """N for FLOPs: active non-embedding params (expected count with zero experts)."""
    counts = count_params(cfg, include_mtp=include_mtp)
    active = counts.get("active_expected", counts["active"])
    return active - counts["embedding"]


# ----------------------------------------------------------------------------------------------
# Published numbers and conventions
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """A publisher's headline parameter counts (in units) and the convention behind them.

    embedding_in_active: the input embedding table is counted among activated parameters
        (the output head always is, by every publisher here).
    mtp_in_total: the MTP modules are counted in "total".
    non_embedding_excludes_head: the publisher's "non-embedding" removes the output head too
        (Ling, Qwen), not only the input embedding (Kaplan et al.).
    active_range: (min, max) activated parameters where they vary per token (LongCat-Flash);
        then ``active`` is the published average.
    """

    total: float
    active: float
    active_non_embedding: Optional[float]
    embedding_in_active: bool
    mtp_in_total: bool
    source: str
    note: str
    non_embedding_excludes_head: bool = False
    active_range: Optional[tuple[float, float]] = None


PUBLISHED: dict[str, Published] = {
    "deepseek-v3": Published(
        total=671e9, active=37e9, active_non_embedding=None,
        embedding_in_active=False, mtp_in_total=False,
        source="DeepSeek-V3 Technical Report (arXiv:2412.19437) §1: '671B total parameters "
               "with 37B activated for each token'; deepseek-ai/DeepSeek-V3 README_WEIGHTS.md",
        note="671B = main model with embedding and head, without the MTP module. README_WEIGHTS"
             ".md: activated 36.6B 'including 0.9B for the output Head' (so the input "
             "embedding is left out), rounded to 37B. MTP module: '11.5B unique parameters' (11.6B "
             "here; 11.5B without eh_proj). "
             "The hub's 685B adds the MTP module, its stored copies of embedding and head, "
             "and FP8 scale tensors.",
    ),
    "deepseek-v2-lite": Published(
        total=15.7e9, active=2.4e9, active_non_embedding=None,
        embedding_in_active=False, mtp_in_total=False,
        source="DeepSeek-V2 report (arXiv:2405.04434) Appendix B; DeepSeek-V2-Lite model card",
        note="Counted as DeepSeek counts V3 (head in, input embedding out) the activated "
             "parameters are 2.45B, 2.1% above the published 2.4B (2.66B with the embedding, "
             "2.24B without embedding and head). 2.45B truncated to one decimal gives 2.4B.",
    ),
    "ling-mini-2.0": Published(
        total=16.26e9, active=1.43e9, active_non_embedding=0.789e9,
        embedding_in_active=True, mtp_in_total=False, non_embedding_excludes_head=True,
        source="inclusionAI Ling-V2 README and Ling-mini-2.0 model card: '1.43B activated of "
               "16.26B total params', '1.4B activated (non-embedding 789M)'",
        note="1.43B includes embedding and head; 789M = 1.43B minus both (0.64B). The released "
             "checkpoint has no MTP layer (trained with one).",
    ),
    "ling-flash-2.0": Published(
        total=102.9e9, active=6.1e9, active_non_embedding=4.8e9,
        embedding_in_active=True, mtp_in_total=False, non_embedding_excludes_head=True,
        source="inclusionAI Ling-flash-2.0 model card: '100B total parameters and 6.1B "
               "activated parameters (4.8B non-embedding)'; hub safetensors count "
               "102,889,705,216",
        note="Marketed as 100B; the checkpoint holds 102.9B, which count_params reproduces to "
             "the parameter (incl. 7,936 float32 expert biases). Non-embedding removes "
             "embedding and head (1.29B).",
    ),
    "longcat-flash": Published(
        total=560e9, active=27e9, active_non_embedding=None,
        embedding_in_active=False, mtp_in_total=False, active_range=(18.6e9, 31.3e9),
        source="LongCat-Flash Technical Report (arXiv:2509.01322) abstract: '560 billion total "
               "parameters ... dynamically activates 18.6B-31.3B (27B on average)'",
        note="Zero-computation experts make activation per token vary: 0 to 12 FFN experts per "
             "layer (min/max); 27B matches 8 = 12*512/768 FFN experts, uniform routing over "
             "the 768 experts. One V*C table is left out. The 0.39B MTP module is within "
             "560B's rounding, so whether it is counted cannot be told.",
    ),
    "mixtral-8x7b": Published(
        total=46.7e9, active=12.9e9, active_non_embedding=None,
        embedding_in_active=True, mtp_in_total=False,
        source="Mistral AI, 'Mixtral of experts' (Dec 2023): '46.7B total parameters but only "
               "uses 12.9B parameters per token'; arXiv:2401.04088",
        note="Counts embedding and head in both numbers.",
    ),
    "qwen3-30b-a3b": Published(
        total=30.5e9, active=3.3e9, active_non_embedding=None,
        embedding_in_active=True, mtp_in_total=False, non_embedding_excludes_head=True,
        source="Qwen3-30B-A3B model card: '30.5B in total and 3.3B activated; "
               "Non-Embedding: 29.9B'",
        note="Counts embedding and head; the card's 29.9B non-embedding total removes both.",
    ),
    "olmoe-1b-7b": Published(
        total=6.9e9, active=1.3e9, active_non_embedding=None,
        embedding_in_active=True, mtp_in_total=False,
        source="OLMoE (arXiv:2409.02060) Table 1 and the OLMoE-1B-7B-0924 model card: 1.3B "
               "active / 6.9B total ('1B active and 7B total' in the name)",
        note="Counts embedding and head.",
    ),
}


def published_counts(name: str) -> dict:
    """Apply the publisher's convention to count_params of preset ``name``.

    Returns {"total", "active"} and, where the publisher gives them,
    "active_non_embedding", "active_min" and "active_max" -- all in parameters.
    """
    if name not in PUBLISHED:
        raise ValueError(f"no published counts for {name!r}; known: {sorted(PUBLISHED)}")
    pub = PUBLISHED[name]
    cfg = ModelConfig.preset(name)
    for_total = count_params(cfg, include_mtp=pub.mtp_in_total)
    main = count_params(cfg, include_mtp=False)  # activated = the main model's forward pass
    drop = 0 if pub.embedding_in_active else main["embedding"]
    out = {
        "total": for_total["total"],
        "active": main.get("active_expected", main["active"]) - drop,
    }
    if pub.active_non_embedding is not None:
        non_emb = main["active"] - main["embedding"]
        if pub.non_embedding_excludes_head:
            non_emb -= main["lm_head"]
        out["active_non_embedding"] = non_emb
    if pub.active_range is not None:
        out["active_min"] = main["active_min"] - drop
        out["active_max"] = main["active_max"] - drop
    return out


# ----------------------------------------------------------------------------------------------
# FLOPs, KV cache, training compute
# ----------------------------------------------------------------------------------------------
def attention_flops_per_token(cfg: ModelConfig, context_length: int) -> float:
    """Scores + weighted values of ONE attention sublayer, averaged over a causal sequence.

    A token attends to context_length / 2 keys on average: 2 * (T/2) * H * (d_qk + d_v).
    """
    H = cfg.num_attention_heads
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    return float(context_length) * H * (d_qk + d_v)


def flops_per_token(
    cfg: ModelConfig, context_length: int, training: bool = False,
    include_mtp: Optional[bool] = None,
) -> float:
    """FLOPs per token: 2 * N_active + attention, times 3 when training (see module docstring).

    N_active = activated matmul parameters (active minus the input embedding; the expected
    count for zero-expert configs). context_length = length of the causal sequence (average
    over its tokens). include_mtp defaults to ``training``: MTP modules run in training.
    """
    if include_mtp is None:
        include_mtp = training
    n_active = _active_matmul_params(cfg, include_mtp=False)
    attn = attention_flops_per_token(cfg, context_length)
    forward = 2.0 * n_active + _n_attention_sublayers(cfg) * attn
    if include_mtp and cfg.num_nextn_predict_layers > 0:
        mtp_active = _active_matmul_params(cfg, include_mtp=True) - n_active  # MTP modules
        head = cfg.vocab_size * cfg.hidden_size  # each MTP depth runs the shared head again
        forward += 2.0 * (mtp_active + cfg.num_nextn_predict_layers * head)
        forward += cfg.num_nextn_predict_layers * attn
    return 3.0 * forward if training else forward


KV_CACHE_KINDS = ("mha", "gqa", "mqa", "mla")


def kv_cache_values_per_layer(cfg: ModelConfig, kind: Optional[str] = None,
                              num_kv_heads: Optional[int] = None) -> int:
    """Numbers one token caches in ONE attention sublayer, for cfg's own attention or a variant.

    kind None = what cfg's attention caches. Otherwise the same query heads and head widths
    cached four ways (DeepSeek-V2 §2.1.4, Table 1: MHA 2 n_h d_h, GQA 2 n_g d_h, MQA 2 d_h,
    MLA d_c + d_h^R, per layer):

    * key width d_k and value width d_v: head_dim for MHA/GQA configs; qk_head_dim
      (nope + rope) and v_head_dim for MLA configs, i.e. what decompressed ("naive") MLA
      caches. Table 1 writes d_k = d_v = d_h; with V3's dims d_k = 192, d_v = 128.
    * "mha": H * (d_k + d_v); "gqa": num_kv_heads * (d_k + d_v), num_kv_heads defaulting
      to cfg.num_key_value_heads (equal to H, hence = MHA, for MHA and MLA presets: pass a
      group count); "mqa": d_k + d_v.
    * "mla": kv_lora_rank + qk_rope_head_dim for MLA configs. For an MHA/GQA config, the
      latent V2 would give it: d_c = 4 d_h, d_h^R = d_h / 2, so 4.5 d_h (Table 1's ratio).
    """
    mla = cfg.attention == "mla"
    if kind is None:
        kind = "mla" if mla else "gqa"
        num_kv_heads = None
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"kind must be None or one of {KV_CACHE_KINDS}, got {kind!r}")
    if mla:
        d_k, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_k = d_v = cfg.head_dim
    if kind == "mha":
        return cfg.num_attention_heads * (d_k + d_v)
    if kind == "gqa":
        groups = cfg.num_key_value_heads if num_kv_heads is None else num_kv_heads
        if groups < 1 or cfg.num_attention_heads % groups:
            raise ValueError(f"num_kv_heads ({groups}) must divide num_attention_heads "
                             f"({cfg.num_attention_heads})")
        return groups * (d_k + d_v)
    if kind == "mqa":
        return d_k + d_v
    if mla:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim  # latent + shared rope key
    return 4 * cfg.head_dim + cfg.head_dim // 2  # V2's ratios: d_c = 4 d_h, d_h^R = d_h / 2


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: float = 2,
                             kind: Optional[str] = None,
                             num_kv_heads: Optional[int] = None) -> float:
    """Bytes of KV cache one token occupies, all attention sublayers, MTP excluded.

    MLA: (kv_lora_rank + qk_rope_head_dim) per sublayer; MHA/GQA: 2 * n_kv_heads * head_dim.
    ``kind`` ("mha" | "gqa" | "mqa" | "mla") asks for a variant with the same heads instead
    (see ``kv_cache_values_per_layer``).
    """
    per_layer = kv_cache_values_per_layer(cfg, kind, num_kv_heads)
    return float(per_layer * _n_attention_sublayers(cfg) * bytes_per_element)


def kv_cache_variants(cfg: ModelConfig, bytes_per_element: float = 2,
                      num_kv_heads: Optional[int] = None) -> dict:
    """KV bytes per token for MHA, GQA, MQA and MLA with cfg's heads and layers, plus "own"."""
    out = {kind: kv_cache_bytes_per_token(cfg, bytes_per_element, kind, num_kv_heads)
           for kind in KV_CACHE_KINDS}
    out["own"] = kv_cache_bytes_per_token(cfg, bytes_per_element)
    return out


def training_compute(
    cfg: ModelConfig, num_tokens: float, gpu_peak_flops: float, utilisation: float,
    context_length: int = 4096,
) -> dict:
    """Training FLOPs for num_tokens and the GPU-hours at a given utilisation (MFU).

    flops = num_tokens * flops_per_token(cfg, context_length, training=True);
    gpu_hours = flops / (gpu_peak_flops * utilisation) / 3600.
    """
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    per_token = flops_per_token(cfg, context_length, training=True)
    flops = num_tokens * per_token
    gpu_hours = flops / (gpu_peak_flops * utilisation) / 3600.0
    return {"flops": flops, "gpu_hours": gpu_hours, "flops_per_token": per_token}


def implied_utilisation(flops: float, gpu_hours: float, gpu_peak_flops: float) -> float:
    """The utilisation (MFU) at which gpu_hours deliver flops: the inverse of the above."""
    return flops / (gpu_hours * 3600.0 * gpu_peak_flops)


# ----------------------------------------------------------------------------------------------
# Summary table
# ----------------------------------------------------------------------------------------------
def _b(n: float) -> str:
    """Parameters in billions (or millions below 1B)."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _flop(n: float) -> str:
    return f"{n / 1e9:.1f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


SIZING_LEGEND = """\
Columns (parameters; B = 10^9):
  total           every weight of the main model, embedding and output head included
  MTP             the multi-token-prediction modules' own weights (not in total)
  active (ours)   total minus the routed experts a token did not pick (router, shared
                  experts, embedding and head count as active); a range with zero experts
  total / active (ours, publisher's rules)
                  the same model counted the way its publisher counts (e.g. with or without
                  the embedding, MTP included or not): comparable with "published"
  published       the numbers the publisher states
  KV cache        bytes cached per token of context, bf16; fwd FLOP: one token's forward pass"""


def summary_table(names: Sequence[str], context_length: int = 4096) -> str:
    """A markdown table: our counts, the publisher's convention and numbers, KV cache, FLOPs.

    "total" and "active" are the main model (embedding and head included, MTP not); "MTP"
    is the MTP modules' own parameters; "total / active (ours, publisher's rules)" is
    published_counts: our count redone the way the publisher counts (SIZING_LEGEND).
    """
    lines = [
        "| model | total | MTP | active (ours) | total / active (ours, publisher's rules) | "
        f"published | KV cache bf16 / token | fwd FLOP / token @ {context_length} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cfg = ModelConfig.preset(name)
        c = count_params(cfg, include_mtp=False)
        mtp = count_params(cfg, include_mtp=True)["mtp"]
        if "active_min" in c:
            active = f"{_b(c['active_min'])}-{_b(c['active_max'])}"
        else:
            active = _b(c["active"])
        if name in PUBLISHED:
            ours, pub = published_counts(name), PUBLISHED[name]
            if pub.active_range is not None:
                conv = (f"{_b(ours['total'])} / {_b(ours['active_min'])}-"
                        f"{_b(ours['active_max'])} (~{_b(ours['active'])})")
                published = (f"{_b(pub.total)} / {_b(pub.active_range[0])}-"
                             f"{_b(pub.active_range[1])} (~{_b(pub.active)})")
            else:
                conv = f"{_b(ours['total'])} / {_b(ours['active'])}"
                published = f"{_b(pub.total)} / {_b(pub.active)}"
        else:
            conv = published = "-"
        kv = kv_cache_bytes_per_token(cfg) / 1024
        flop = _flop(flops_per_token(cfg, context_length))
        lines.append(f"| {name} | {_b(c['total'])} | {_b(mtp) if mtp else '-'} | {active} | "
                     f"{conv} | {published} | {kv:.1f} KiB | {flop} |")
    return "\n".join(lines)


PUBLISHED_PRESETS = tuple(name for name in PRESETS if name in PUBLISHED)


if __name__ == "__main__":
    print(summary_table(list(PRESETS)))
    v3 = ModelConfig.preset("deepseek-v3")
    run = training_compute(v3, 14.8e12, gpu_peak_flops=989e12, utilisation=1.0)
    print()
    print(f"DeepSeek-V3 pre-training, 14.8T tokens at 4096 context (MTP included): "
          f"{run['flops']:.3e} FLOPs, {run['flops_per_token'] / 1e9:.0f} GFLOP/token")
    print("Reported (V3 report Table 1): 2.664M H800 GPU-hours pre-training, 2.788M in all "
          "(+0.119M context extension, +0.005M post-training)")
    for peak_name, peak in (("bf16 dense 989 TFLOPS", 989e12), ("fp8 dense 1979 TFLOPS", 1979e12)):
        mfu = implied_utilisation(run["flops"], 2.664e6, peak)
        print(f"  implied utilisation of the 2.664M pre-training hours vs {peak_name}: {mfu:.1%}")
