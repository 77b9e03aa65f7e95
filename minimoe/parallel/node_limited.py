"""Node-limited routing: every token's experts on at most M nodes, and what that saves.

The idea
--------
Between the GPUs of one node tokens travel over NVLink (DeepSeek-V3's H800s: 160 GB/s per
GPU); between nodes over InfiniBand (50 GB/s per GPU) -- about 3.2x slower (DeepSeek-V3
technical report §3.2.2). A token whose k experts are spread over many nodes crosses IB
many times. DeepSeek-V3 §2.1.2 ("Node-Limited Routing") therefore restricts the choice:

    "each token will be sent to at most M nodes, which are selected according to the sum
     of the highest K_r / M affinity scores of the experts distributed on each node"

with K_r = 8 routed experts per token and M = 4. In formulas, with s'_i the (biased)
selection scores, experts placed on nodes in contiguous blocks:

    node score  S_n = sum of the K_r/M largest s'_i with expert i on node n
    keep the M nodes with the largest S_n; s'_i = -inf for experts on the other nodes
    idx = TopK(s', K_r)

which is ``minimoe.router.select_experts`` with n_group = number of nodes, topk_group = M
and the top-2 group score (K_r / M = 2): V3's "group-limited" router *is* its node-limited
routing when each group is a node (its 8 groups = the 8 nodes of its 64-way EP, §3.2).
The tests check the equality; this module writes it for any K_r / M and any placement of
ranks on nodes.

How the dispatch uses it (§3.2.2, and DeepEP's internode kernels)
-----------------------------------------------------------------
A token is sent over IB *once per target node*, to the GPU with the same in-node index as
its source GPU, which forwards it over NVLink to the GPUs of that node that hold its
experts. With node-limited routing a token crosses IB at most M times (at most M - 1 when
one of its nodes is its own), and each of its copies fans out to an average of K_r / M
experts per node; §3.2.2 notes up to 3.2 experts per node fit the same time budget, 13 in
all. ``count_traffic`` counts these copies on a real routing decision; ``compare_routing``
reports them with and without the limit, and ``minimoe.parallel.comm`` turns them into
bytes and microseconds.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch


def node_of_expert(n_experts: int, n_ranks: int, ranks_per_node: int) -> torch.Tensor:
    """(E,) node index of every expert: expert e on rank e // (E/W), rank r on node r // R."""
    if n_experts % n_ranks or n_ranks % ranks_per_node:
        raise ValueError(f"{n_experts} experts must split evenly over {n_ranks} ranks, and "
                         f"the ranks evenly over nodes of {ranks_per_node}")
    rank = torch.arange(n_experts) // (n_experts // n_ranks)  # (E,)
    return rank // ranks_per_node  # (E,)


def node_limited_topk(scores: torch.Tensor, k: int, expert_node: torch.Tensor, max_nodes: int,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeek-V3's node-limited top-k: scores (N, E), expert_node (E,) -> idx (N, k).

    Node score = sum of the k / max_nodes largest biased scores on the node; experts of all
    but the max_nodes best nodes are excluded (-inf), then the top-k of what remains."""
    N, E = scores.shape
    n_nodes = int(expert_node.max()) + 1
    if k % max_nodes:
        raise ValueError(f"node-limited routing scores a node by its top k/M experts: "
                         f"k={k} is not a multiple of max_nodes={max_nodes}")
    per_node_top = k // max_nodes
    if not 1 <= max_nodes <= n_nodes:
        raise ValueError(f"max_nodes must be in [1, {n_nodes}], got {max_nodes}")
    choice = scores if bias is None else scores + bias.to(scores.dtype)  # (N, E)
    node_scores = torch.full((N, n_nodes), float("-inf"), dtype=choice.dtype)  # (N, nodes)
    for node in range(n_nodes):
        members = choice[:, expert_node == node]  # (N, E_node)
        if members.shape[1] < per_node_top:
            raise ValueError(f"node {node} holds {members.shape[1]} experts, fewer than k/M="
                             f"{per_node_top}")
        node_scores[:, node] = members.topk(per_node_top, dim=-1).values.sum(-1)
    kept_nodes = node_scores.topk(max_nodes, dim=-1).indices  # (N, M)
    keep = (expert_node.view(1, 1, E) == kept_nodes.unsqueeze(-1)).any(dim=1)  # (N, E)
    return choice.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices  # (N, k)


def count_traffic(topk_idx: torch.Tensor, source_rank: torch.Tensor, n_experts: int,
                  n_ranks: int, ranks_per_node: int) -> dict:
    """Copies of each token that the dispatch sends, averaged over tokens.

    topk_idx (N, k) global experts; source_rank (N,) the rank each token lives on.
      slots        k: one row per (token, expert), a plain all-to-all (minimoe's dispatch)
      ranks        distinct destination ranks other than the source (one copy per GPU)
      remote_nodes distinct destination nodes other than the source's: IB copies (DeepEP)
      nvlink       copies forwarded inside nodes: destination ranks that are not the
                   IB receiver itself (ranks on the source node count directly)
    """
    expert_rank = torch.arange(n_experts) // (n_experts // n_ranks)  # (E,)
    dest_rank = expert_rank[topk_idx]  # (N, k)
    dest_node = dest_rank // ranks_per_node  # (N, k)
    source_node = source_rank // ranks_per_node  # (N,)
    N, k = topk_idx.shape
    rank_hit = torch.zeros(N, n_ranks, dtype=torch.bool).scatter_(1, dest_rank, True)  # (N, W)
    node_hit = rank_hit.view(N, -1, ranks_per_node).any(-1)  # (N, nodes)
    rank_hit[torch.arange(N), source_rank] = False  # a token's own rank needs no copy
    remote = node_hit.clone()
    remote[torch.arange(N), source_node] = False
    # the IB receiver on a remote node is the GPU with the source's in-node index
    receiver = (torch.arange(node_hit.shape[1]) * ranks_per_node).unsqueeze(0) \
        + (source_rank % ranks_per_node).unsqueeze(1)  # (N, nodes)
    receiver_hit = rank_hit.gather(1, receiver) & remote  # (N, nodes)
    nvlink = rank_hit.sum(1) - receiver_hit.sum(1)  # (N,)
    return {"slots": float(k), "ranks": float(rank_hit.sum(1).float().mean()),
            "remote_nodes": float(remote.sum(1).float().mean()),
            "max_remote_nodes": int(remote.sum(1).max()) if N else 0,
            "nvlink": float(nvlink.float().mean()),
            "nodes_per_token": float(node_hit.sum(1).float().mean())}


def compare_routing(n_experts: int, k: int, n_ranks: int, ranks_per_node: int, max_nodes: int,
                    n_tokens: int = 4096, seed: int = 0) -> dict:
    """Traffic of unrestricted top-k vs node-limited top-k on the same random affinities.

    Sigmoid affinities of a random router (every expert equally likely: a balanced load),
    tokens spread evenly over the ranks. Returns {"top-k": counts, "node-limited": counts}."""
    return copy.deepcopy(_compare_routing(n_experts, k, n_ranks, ranks_per_node, max_nodes,
                                          n_tokens, seed))


@functools.lru_cache(maxsize=16)
def _compare_routing(n_experts, k, n_ranks, ranks_per_node, max_nodes, n_tokens, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_tokens, n_experts, generator=gen).sigmoid()  # (N, E)
    source_rank = torch.arange(n_tokens) % n_ranks  # (N,)
    expert_node = node_of_expert(n_experts, n_ranks, ranks_per_node)  # (E,)
    plain = scores.topk(k, dim=-1).indices  # (N, k)
    limited = node_limited_topk(scores, k, expert_node, max_nodes)  # (N, k)
    return {name: count_traffic(idx, source_rank, n_experts, n_ranks, ranks_per_node)
            for name, idx in (("top-k", plain), ("node-limited", limited))}
