"""Load balance: keeping every expert busy, and measuring how well that works.

The formulas and their sources live here; notebook 02 runs each of them on small tensors
and compares them on five trained twins.

Why balance at all
------------------
A router trained only on the language-modelling loss tends to *collapse*: the experts
that happen to be picked early get better, so they get picked more, and the rest starve.
A collapsed MoE is a small dense model paying for a large one; in expert-parallel
training it is also slow, because the busiest device sets the pace. Four tools fight
collapse, all pure functions here (the MoE layer decides which ones to use):

1. The Switch / GShard auxiliary loss (GShard, Lepikhin et al. 2020 §2.2; Switch
   Transformer, Fedus et al. 2021 §2.2). With f_i the fraction of token-slots routed to
   expert i and P_i the mean router probability of expert i,

       L_aux = E * sum_i f_i * P_i,      f_i = count_i / (N k),   P_i = mean_t p_{t,i}

   f is not differentiable (it counts argmax choices), P is: the gradient
   dL/dp_{t,i} = E f_i / N pushes probability mass away from the experts that are
   already overloaded. Minimised (= 1) by uniform routing; a router that sends every
   token to one expert with probability 1 scores E. (HF's Mixtral/Qwen3 helper divides
   the counts by N instead of N k, so its value is k times this one.)

2. DeepSeek-V3's sequence-wise auxiliary loss (technical report §2.1.2, Eq. 17-20). The
   same product, computed within each sequence of length T so that no single sequence
   is extremely unbalanced, with a tiny weight (alpha = 1e-4) because the bias update
   (4.) does the main work:

       f_i  = E / (k T) * sum_t 1[expert i in TopK of token t]     (Eq. 18)
       s'_{i,t} = s_{i,t} / sum_j s_{j,t}                          (Eq. 19)
       P_i  = 1/T * sum_t s'_{i,t}                                 (Eq. 20)
       L_bal = alpha * sum_i f_i P_i                               (Eq. 17)

   Eq. 19 matters for sigmoid routers: their scores do not sum to one, so they are
   normalised over the E experts first. Eq. 18's f_i is E times the f_i of 1., so
   L_bal / alpha is exactly L_aux computed on one sequence; here it is averaged over the
   B sequences of a batch.

3. The router z-loss (ST-MoE, Zoph et al. 2022 §3, Eq. 5):

       L_z = 1/N * sum_t ( log sum_j exp(u_{t,j}) )^2

   It keeps the logits u small, so the exponentials in the softmax stay in the range
   where bf16 round-off does not flip routing decisions. Ling-2.0 uses it with weight
   3.5e-6 (even with a sigmoid router), OLMoE with 1e-3.

4. The auxiliary-loss-free bias update (Wang et al. 2024, "Auxiliary-Loss-Free Load
   Balancing Strategy for Mixture-of-Experts"; DeepSeek-V3 §2.1.2). After each training
   step, with load_i the number of token-slots expert i received:

       b_i <- b_i + gamma * sign(mean_j load_j - load_i)

   Overloaded experts lose bias and are chosen less; underloaded ones gain. The bias
   only changes the choice, never the gate weight (see minimoe.router). gamma = 0.001
   in DeepSeek-V3 (set to 0 for the last 500B tokens). torchtitan and Ling-2.0 subtract
   the mean of the update so that sum_i b_i stays constant (torchtitan issue #1506): with
   sign() the raw update has a nonzero mean whenever more experts sit on one side of the
   mean load than on the other, and the biases would drift together for no reason.
   (LongCat-Flash's report describes its own variant of this bias controller, which
   steers how often the zero-computation experts are chosen; it is not implemented here.)

Token dropping
--------------
Expert-parallel systems give each expert a fixed buffer, its *capacity*

    C = ceil(capacity_factor * N * k / E)

(Switch §2.2 writes tokens_per_batch / E * capacity_factor for k = 1; GShard uses 2N/E
for its top-2 gating). Slots beyond an expert's capacity are dropped: the token's
residual stream passes through without that expert. `capacity_keep_mask` implements
the GShard order: a token's j-th choice is its j-th largest gate weight; first the
top-1 slots of all tokens are placed in token order, then the top-2 slots, and so on.
A token's best expert is thus never displaced by somebody else's second choice.

Measuring balance
-----------------
`router_stats` reports, per layer: the load (fraction of kept slots per expert), MaxVio
(Wang et al. 2024: (max_i load_i - mean load) / mean load; 0 is perfect, E - 1 is total
collapse), the dropped fraction, and the mean per-token entropy of the routing
distribution in nats (ln E for a router that cannot decide, 0 for a confident one).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from minimoe.traceable import count_per_expert


def switch_aux_loss(probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """The Switch/GShard load-balancing loss; a scalar (1 for uniform routing).

        L = E * sum_i f_i * P_i,   f_i = count_i / (N k),   P_i = 1/N * sum_t probs[t, i]

    probs (N, E) must be a distribution over experts (softmax output; for a sigmoid router
    normalise the scores over E first, as DeepSeek-V3 Eq. 19). topk_idx (N, k). The gradient
    flows through probs only.
    """
    N, E = probs.shape
    k = topk_idx.shape[1]
    # BEGIN SOLUTION switch-aux-loss
    counts = torch.bincount(topk_idx.reshape(-1), minlength=E).to(probs.dtype)  # (E,)
    slot_fraction = counts / (N * k)  # (E,)  f_i
    mean_prob = probs.mean(dim=0)  # (E,)  P_i
    return E * (slot_fraction * mean_prob).sum()
    # END SOLUTION


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (Eq. 17-20) without alpha, averaged over B.

    scores (B, T, E) are the raw affinities (softmax or sigmoid), topk_idx (B, T, k).

        f_{b,i} = E / (k T) * #{t : i in topk_idx[b, t]}
        P_{b,i} = 1/T * sum_t s_{b,t,i} / sum_j s_{b,t,j}
        L = 1/B * sum_b sum_i f_{b,i} P_{b,i}
    """
    B, T, E = scores.shape
    k = topk_idx.shape[-1]
    # BEGIN SOLUTION sequence-aux-loss
    normalised = scores / scores.sum(dim=-1, keepdim=True)  # (B, T, E)  s'
    mean_prob = normalised.mean(dim=1)  # (B, E)  P_i per sequence
    one_hot_slots = torch.zeros(B, T * k, E, dtype=scores.dtype, device=scores.device)  # (B, T*k, E)
    one_hot_slots.scatter_(2, topk_idx.reshape(B, T * k, 1), 1.0)
    counts = one_hot_slots.sum(dim=1)  # (B, E)
    frequency = counts * (E / (k * T))  # (B, E)  f_i per sequence
    return (frequency * mean_prob).sum(dim=-1).mean()
    # END SOLUTION


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, Eq. 5): mean over tokens of logsumexp(u)^2.

    logits (N, E) -> scalar.
    """
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def update_expert_bias(
    bias: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    rate: float,
    zero_mean: bool,
) -> None:
    """Auxiliary-loss-free balancing step, in place (DeepSeek-V3 §2.1.2; Wang et al. 2024).

        delta_i = rate * sign(mean_j load_j - load_i)
        delta   = delta - mean(delta)             if zero_mean (torchtitan, Ling-2.0)
        b_i    += delta_i

    bias (E,) is modified in place without autograd; tokens_per_expert (E,) are the counts
    (or fractions: only their order relative to the mean matters) of the last step.
    """
    # BEGIN SOLUTION aux-loss-free-bias
    with torch.no_grad():
        load = tokens_per_expert.to(device=bias.device, dtype=torch.float32)  # (E,)
        delta = rate * torch.sign(load.mean() - load)  # (E,)
        if zero_mean:
            delta = delta - delta.mean()  # (E,)
        bias.add_(delta.to(bias.dtype))
    # END SOLUTION


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * N * k / E): token-slots one expert may keep."""
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def capacity_keep_mask(
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    n_experts: int,
    capacity_factor: float,
) -> torch.Tensor:
    """Which token-slots fit into their expert's capacity; BoolTensor (N, k).

    Priority (GShard order): rank each token's k slots by decreasing gate weight (ties:
    slot order). All rank-0 slots are placed first, in token order, then all rank-1 slots,
    and so on; an expert keeps the first C = ceil(capacity_factor * N * k / E) slots it
    receives and drops the rest.
    """
    N, k = topk_idx.shape
    capacity = expert_capacity(N, k, n_experts, capacity_factor)

    # BEGIN SOLUTION capacity-dropping
    # 1. A token's choice rank: its slots sorted by decreasing weight (stable for ties).
    rank_order = torch.sort(topk_weight, dim=-1, descending=True, stable=True).indices  # (N, k)
    ranked_experts = topk_idx.gather(1, rank_order)  # (N, k)  [t, r] = expert of t's r-th choice

    # 2. Priority order: rank-major, then token order -> a flat queue of N*k slots.
    queue = ranked_experts.t().reshape(-1)  # (k*N,)
    one_hot = torch.nn.functional.one_hot(queue, n_experts)  # (k*N, E)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # (k*N,)  place in its expert's queue
    keep_ranked = (position < capacity).view(k, N).t()  # (N, k)  in rank order

    # 3. Back from rank order to the caller's slot order.
    keep = torch.empty_like(keep_ranked)  # (N, k)
    keep.scatter_(1, rank_order, keep_ranked)
    return keep
    # END SOLUTION


def router_stats(
    topk_idx: torch.Tensor,
    probs: torch.Tensor,
    n_experts: int,
    keep_mask: Optional[torch.Tensor] = None,
) -> dict:
    """Balance statistics of one routing decision (detached; for logging and plots).

    topk_idx (N, k), probs (N, E) (normalised over E inside), keep_mask (N, k) or None.
    Returns
      tokens_per_expert (E,) long   kept slots per expert
      load              (E,) float  tokens_per_expert / total kept (zeros if none kept)
      max_vio           float       (max_i load_i - mean load) / mean load   (Wang et al. 2024)
      dropped_fraction  float       1 - kept slots / (N k)
      entropy           float       1/N * sum_t -sum_i p_{t,i} ln p_{t,i}, p = probs / sum probs
    (the three floats are 0-dim tensors inside a torch.compile graph: no value is read there)
    """
    with torch.no_grad():
        N, k = topk_idx.shape
        kept_experts = topk_idx.reshape(-1)  # (N*k,)
        if keep_mask is not None:
            kept_experts = kept_experts[keep_mask.reshape(-1)]  # (kept,)
        tokens_per_expert = count_per_expert(kept_experts, n_experts)  # (E,)
        kept = tokens_per_expert.sum()  # () long
        load = tokens_per_expert.float() / kept.clamp(min=1)  # (E,)
        mean_load = load.mean()
        max_vio = torch.where(kept > 0, (load.max() - mean_load) / mean_load, 0.0)  # ()

        p = probs.detach().float()
        p = p / p.sum(dim=-1, keepdim=True)  # (N, E)
        entropy = -torch.special.xlogy(p, p).sum(dim=-1).mean() if N > 0 else p.new_zeros(())
        dropped = 1.0 - kept / (N * k) if N * k > 0 else kept.new_zeros((), dtype=torch.float)
        scalars = {"max_vio": max_vio, "dropped_fraction": dropped, "entropy": entropy}
        if not torch.compiler.is_compiling():  # Python floats; 0-dim tensors in a compiled graph
            scalars = {name: float(value) for name, value in scalars.items()}
        return {
            "load": load,
            **scalars,
            "tokens_per_expert": tokens_per_expert,
        }
