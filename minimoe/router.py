"""The router: which experts does each token visit, and with what weight?

The formulas and their sources live here; notebook 02 runs each router on small tensors
and compares the balancing methods on five trained twins.

How routing works
-----------------
An MoE layer holds E experts. For every token x (a vector of width C) the router computes
one *logit* per expert with a single matrix, turns the logits into *affinities* (scores),
keeps the k best experts and hands the expert layer two small tensors:

    logits  u   = x W^T                              (N, E)   W is `gate.weight`, (E, C)
    scores  s   = softmax(u)  or  sigmoid(u)         (N, E)
    chosen  idx = TopK(s [+ b], k)                   (N, k)   b is a selection-only bias
    weights g   = s[idx]  (/ sum_k s[idx])  * rsf    (N, k)   rsf = routed_scaling_factor

and the layer's output is  y = sum_j g_j * Expert_{idx_j}(x)  (plus shared experts, which
are not the router's business). Every model minimoe teaches is a choice of four knobs in
those four lines: the scoring function, how the top-k is restricted (groups), whether a
bias steers the choice, and how the chosen scores become gate weights.

1. Softmax routing (Shazeer et al. 2017; GShard; Switch; Mixtral, Qwen3-MoE, OLMoE,
   DeepSeek-V2, LongCat-Flash). s = softmax(u) over all E experts. Without renormalisation
   the k gate weights sum to less than one (DeepSeek-V2, OLMoE, LongCat-Flash); with
   `norm_topk_prob` they are renormalised over the chosen k, which equals a softmax over
   the k kept logits only (Mixtral, Qwen3).

2. Sigmoid routing (DeepSeek-V3 technical report §2.1.2, Eq. 12-15; Ling-2.0).
   s_i = sigmoid(u_i): each expert's affinity is judged on its own, not in competition
   with the others, so the scores do not sum to one. DeepSeek-V3 therefore always
   renormalises the chosen k (Eq. 13: g_i = g'_i / sum_j g'_j) and multiplies by
   routed_scaling_factor (2.5 for V3 and Ling-2.0) to restore the output scale.
   Like the HF DeepSeek-V3 code, `gate_weights` adds 1e-20 to the denominator.

3. Noisy top-k (Shazeer et al. 2017, "Outrageously Large Neural Networks", Eq. 3-5).
   During training only, Gaussian noise with a learned, per-token, per-expert scale is
   added to the logits before the top-k:

       H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)

   It spreads early routing decisions so that experts are not starved before they learn.
   `noise_weight` starts at zero, so the initial noise scale is softplus(0) = ln 2 ~ 0.69;
   the gradient reaches W_noise through the scale. Shazeer applies softmax to the k kept
   noisy logits; here the softmax runs over all E noisy logits and norm_topk_prob
   renormalises over the k, which is the same number.

4. Group-limited routing (DeepSeek-V2 §2.2 "device-limited routing"; DeepSeek-V3 §2.1.2
   "node-limited routing"). The E experts are split into n_group contiguous groups (in
   training each group lives on one device or node). A token may use experts from at most
   topk_group groups, which bounds its all-to-all communication:

       group score  G_g = max_{i in g} s'_i                     (V2: group_limited_greedy)
                    G_g = sum of the two largest s'_i in g      (V3: noaux_tc)
       keep the topk_group best groups, set s'_i = -inf for every expert in the others,
       then take the top-k of what is left.

   where s' = s + b are the *biased* scores (b = 0 without a bias).

5. Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
   Strategy for Mixture-of-Experts"; DeepSeek-V3 §2.1.2 Eq. 16). A per-expert bias b_i
   (the buffer `e_score_correction_bias`, its name in the HF checkpoints) is added to the
   scores *for the top-k choice only*:

       g'_i = s_i   if  s_i + b_i in TopK({s_j + b_j}, k)   else 0          (Eq. 16)

   After each step b_i moves against the load of expert i (see `minimoe.balance.
   update_expert_bias`), so overloaded experts are chosen less often, with no gradient
   and no loss term fighting the language-modelling loss.

6. Zero-computation experts (LongCat-Flash technical report; HF LongcatFlashTopkRouter).
   LongCat-Flash appends n_zero_experts identity experts (output = input) to its 512 FFN
   experts. They have router logits like any other expert, compete in the same softmax
   and the same top-k (with the same correction bias), and a token that picks them simply
   spends less compute. Here they are the indices  >= n_routed_experts.  The router does
   not treat them specially: in the HF LongCat code routed_scaling_factor multiplies every
   gate, zero experts included; what an identity expert does with its weight, and why that
   was a real question between runtimes, is the MoE layer's story (``minimoe.moe``).
   With n_group > 1 the groups are cut over all E = n_routed + n_zero indices.

What to notice
--------------
* The bias is used ONLY for selection. Gate weights are gathered from the *unbiased*
  scores. Feeding s + b into the weights was a real bug in an inference engine (vLLM PR
  #12002): the bias is a balancing device, not part of the learned function.
* Experts of dropped groups are masked with -inf, never with 0. Sigmoid and softmax
  scores are positive, but s + b can be negative; a masked 0 would then beat the
  legitimate negative scores and pick an expert from a group the token was not allowed
  to use (DeepSeek-V3 issue #741, vLLM PR #13474; DeepSeek's own inference/model.py uses
  float("-inf")). tests/test_router.py has a hand case where 0 picks the wrong experts.
* V3 scores a group by the sum of its top-2 biased scores, V2 by the max. They can choose
  different groups: [0.9, 0.1] beats [0.6, 0.6] on max but loses on top-2 sum.
  (DeepSeek's inference/model.py uses the max when the gate has no bias and the top-2 sum
  when it has one; here the choice follows topk_method, as in the HF configs.)
* Logits are computed in float32 (x.float() @ W.float()^T), as DeepSeek and the HF code
  do: a bf16 router flips near-tied top-k choices and makes gate weights coarse.
* DeepSeek-V2's HF code multiplies by routed_scaling_factor only when it does *not*
  renormalise; V3's code (and this module) renormalises (if asked) and then always
  multiplies. No published V2 config combines norm_topk_prob=True with a factor other
  than 1, so both conventions give the same numbers on real checkpoints.
* The fast path: with ``kernels="triton"`` (``minimoe.kernel_switch``) everything after the
  logits -- scores, bias, groups, top-k, gate weights -- runs as one Triton kernel per
  token row (``minimoe.kernels.moe_router``), with an analytic backward; the logits matmul
  and the training noise stay in PyTorch. On equal choice scores the kernel picks the
  lower expert index; torch.topk leaves that order unspecified.
* A router forward returns `scores` WITHOUT the bias: the balance losses and statistics
  (minimoe.balance) must see the model's real affinities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimoe import kernel_switch

GROUP_SCORES = ("top2_sum", "max")


@dataclass
class RouterOutput:
    """What the router hands to the expert layer and to the balance losses.

    topk_idx:    (N, k) long     chosen expert indices per token (zero experts: >= n_routed_experts)
    topk_weight: (N, k) float32  final gate weights (renormalised if asked, times routed_scaling_factor)
    scores:      (N, E) float32  affinities after softmax / sigmoid, WITHOUT the selection bias
    logits:      (N, E) float32  the raw router logits (noise included in training when noisy_gating)
    """

    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


def select_experts(
    scores: torch.Tensor,
    k: int,
    *,
    bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "top2_sum",
) -> torch.Tensor:
    """Group-limited top-k selection on (optionally biased) scores.

    scores: (N, E) affinities; bias: (E,) or None; returns topk_idx (N, k), long, ordered by
    decreasing biased score. Steps (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2):

        s' = s + b                                                  (N, E)
        if n_group > 1:
            G_g = max_{i in g} s'_i            (group_score="max",      V2)
                  top1(s'_g) + top2(s'_g)      (group_score="top2_sum", V3)
            keep the topk_group largest G_g; s'_i = -inf outside kept groups
        idx = TopK(s', k)

    The masked value is -inf, not 0: s' can be negative once a bias is added.
    """
    if scores.dim() != 2:
        raise ValueError(f"select_experts expects scores of shape (N, E), got {tuple(scores.shape)}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    N, E = scores.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")

    choice_scores = scores if bias is None else scores + bias.to(scores.dtype)  # (N, E)

    if n_group > 1:
        if E % n_group != 0:
            raise ValueError(f"E={E} experts cannot be split into n_group={n_group} equal groups")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
        per_group = E // n_group
        if topk_group * per_group < k:
            raise ValueError(f"topk_group={topk_group} groups of {per_group} experts hold fewer "
                             f"than k={k} experts")
        # BEGIN SOLUTION group-limited-routing
        grouped = choice_scores.view(N, n_group, per_group)  # (N, G, E/G)
        if group_score == "max":
            group_scores = grouped.max(dim=-1).values  # (N, G)
        else:
            if per_group < 2:
                raise ValueError("group_score='top2_sum' needs at least 2 experts per group")
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        kept_groups = group_scores.topk(topk_group, dim=-1).indices  # (N, topk_group)
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool)  # (N, G)
        group_keep.scatter_(1, kept_groups, True)
        expert_keep = group_keep.unsqueeze(-1).expand(N, n_group, per_group).reshape(N, E)  # (N, E)
        choice_scores = choice_scores.masked_fill(~expert_keep, float("-inf"))  # (N, E)
        # END SOLUTION

    return choice_scores.topk(k, dim=-1).indices  # (N, k)


def gate_weights(
    scores: torch.Tensor,
    topk_idx: torch.Tensor,
    *,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> torch.Tensor:
    """Gate weights of the chosen experts, from the UNBIASED scores.

        w_j = s[idx_j]                                        (N, k)
        w_j = w_j / (sum_j w_j + 1e-20)     if norm_topk_prob (DeepSeek-V3 Eq. 13)
        w_j = w_j * routed_scaling_factor
    """
    # BEGIN SOLUTION router-scoring
    weights = scores.gather(1, topk_idx)  # (N, k)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # (N, k)
    return weights * routed_scaling_factor  # (N, k)
    # END SOLUTION


class Router(nn.Module):
    """The MoE gate of one layer: x (N, C) -> RouterOutput.

    Parameters and buffers keep their Hugging Face names so checkpoints load directly:
      weight                   (E, C)  `gate.weight`
      e_score_correction_bias  (E,)    float32 buffer, persistent; used iff cfg.use_expert_bias
      noise_weight             (E, C)  only when cfg.noisy_gating (Shazeer et al. 2017)
    with E = cfg.n_routed_experts + cfg.n_zero_experts.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.n_zero_experts = cfg.n_zero_experts
        self.n_experts = cfg.n_routed_experts + cfg.n_zero_experts
        self.hidden_size = cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.scoring_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.n_group = cfg.n_group if cfg.topk_method != "greedy" else 1
        self.topk_group = cfg.topk_group if cfg.topk_method != "greedy" else 1
        self.group_score = "max" if cfg.topk_method == "group_limited_greedy" else "top2_sum"
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.use_expert_bias = cfg.use_expert_bias
        self.noisy_gating = cfg.noisy_gating

        self.weight = nn.Parameter(torch.empty(self.n_experts, self.hidden_size))  # (E, C)
        nn.init.normal_(self.weight, mean=0.0, std=cfg.initializer_range)
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32), persistent=True
        )  # (E,)
        if self.noisy_gating:
            self.noise_weight = nn.Parameter(torch.zeros(self.n_experts, self.hidden_size))  # (E, C)
        else:
            self.register_parameter("noise_weight", None)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: (N, C) or (..., C) (flattened to N tokens). Returns a RouterOutput over N tokens."""
        x = x.reshape(-1, self.hidden_size).float()  # (N, C) float32
        # float32 even under mixed precision: autocast would run this matmul in bf16
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = x @ self.weight.float().t()  # (N, E)
            if self.noisy_gating and self.training:
                noise_scale = F.softplus(x @ self.noise_weight.float().t())  # (N, E)
                logits = logits + torch.randn_like(logits) * noise_scale  # (N, E)

        bias = self.e_score_correction_bias if self.use_expert_bias else None
        kernel = kernel_switch.router_kernel(logits)  # None unless kernels="triton" can run here
        if kernel is not None:  # minimoe.kernels.moe_router: the steps below in one kernel
            topk_idx, topk_weight, scores = kernel(
                logits, bias, top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                group_score=self.group_score, scoring_func=self.scoring_func,
                norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
            )  # (N, k), (N, k), (N, E)
            return RouterOutput(topk_idx=topk_idx, topk_weight=topk_weight, scores=scores,
                                logits=logits)

        # BEGIN SOLUTION router-scoring
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)  # (N, E)
        else:
            scores = logits.sigmoid()  # (N, E)
        # END SOLUTION

        with torch.no_grad():  # the choice is discrete: no gradient flows through it
            topk_idx = select_experts(
                scores.detach(), self.top_k, bias=bias, n_group=self.n_group,
                topk_group=self.topk_group, group_score=self.group_score,
            )  # (N, k)
        topk_weight = gate_weights(
            scores, topk_idx, norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )  # (N, k)
        return RouterOutput(topk_idx=topk_idx, topk_weight=topk_weight, scores=scores, logits=logits)

    def extra_repr(self) -> str:
        return (f"experts={self.n_routed_experts}+{self.n_zero_experts} zero, top_k={self.top_k}, "
                f"scoring={self.scoring_func}, method={self.topk_method}, "
                f"groups={self.topk_group}/{self.n_group}, bias={self.use_expert_bias}, "
                f"noisy={self.noisy_gating}")
