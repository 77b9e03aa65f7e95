"""Expert parallelism: the experts of one MoE layer spread over the processes of a group.

The idea
--------
DeepSeek-V3 has 256 routed experts per layer, 58 MoE layers, and each expert is a 44M-
parameter SwiGLU: no device holds them all. Expert parallelism (EP; GShard, Lepikhin et al.
2020 §3; DeepSeek-V3 technical report §3.2.2 and §3.4) gives each of the W processes
("ranks") of a group E / W experts, while everything else in the layer -- the router and
the shared experts -- is replicated. Every rank also holds its own tokens (a slice of the
batch, as in data parallelism). One MoE layer then runs as

    route locally   -> every token picks k experts, most of them on other ranks
    dispatch        -> all-to-all: each rank sends each token row to the ranks that own
                       its experts                                     (N*k rows leave)
    expert compute  -> every rank runs its E / W experts on the rows it received
    combine         -> all-to-all back: each result row returns to the token's rank
    weight and add  -> y_t = sum_j g_{t,j} FFN_{idx_{t,j}}(x_t) on the token's own rank

which is the formula of ``minimoe.moe`` evaluated with the sum's terms computed elsewhere.

Expert e lives on rank e // (E / W) (contiguous blocks, as Megatron-LM and torchtitan place
them). After the sort of ``minimoe.moe.dispatch_sorted``, a rank's slots are grouped by
expert, hence by destination rank: the all-to-all sends one contiguous block to each rank.

Counts first, then tokens
-------------------------
An all-to-all with *uneven* splits needs both sides to know the sizes: rank s sends
``send[s][d]`` rows to rank d, and rank d must allocate ``recv[d][s] = send[s][d]`` rows
before the exchange. So every layer runs two all-to-alls per direction:

    1. counts:  counts[e] = slots of this rank routed to expert e                 (E,)
                all_to_all with equal splits (E / W per rank) ->
                received[s, j] = rows rank s will send for my local expert j    (W, E/W)
    2. tokens:  send splits  = counts.view(W, E/W).sum(1)                         (W,)
                recv splits  = received.sum(1)                                    (W,)
                all_to_all_single(rows (M, C), splits) -> (R, C), ordered by source
                rank, then by local expert within each source's block.

The received rows are then regrouped by local expert (a stable sort on the local expert
index) so that the grouped SwiGLU of ``minimoe.moe.grouped_swiglu`` sees contiguous blocks,
and ungrouped afterwards. torchtitan's ``ExpertParallel._token_dispatch`` (torchtitan/
distributed/expert_parallel.py) and Megatron-LM's ``MoEAlltoAllTokenDispatcher`` (megatron/
core/transformer/moe/token_dispatcher.py: ``input_splits`` = tokens per expert reshaped to
(ep_size, local experts) and summed; moe_utils.sort_chunks_by_idxs regroups) do exactly
these steps; DeepEP (deepseek-ai/DeepEP) fuses them into one kernel per direction.

Gradients
---------
The dispatch all-to-all is a permutation of rows across processes; its backward is the
all-to-all with send and receive splits swapped, which
``torch.distributed.nn.functional.all_to_all_single`` implements as an autograd Function.
The gradient of expert e's weights is therefore the sum over *all* ranks' tokens routed to
e, computed where e lives; the replicated router and shared experts get only their own
tokens' part, and a trainer sums those over ranks (an all-reduce, as data parallelism
does). ``minimoe.parallel.check`` proves both against the single-process layer.
The gate weights g_{t,j} never travel: they multiply the returned rows on the token's own
rank, so their gradient stays local too.

What this teaching version does not do
--------------------------------------
* A token whose k experts sit on the same rank is sent k times; DeepEP sends it once per
  rank (and once per *node* over InfiniBand) and lets the receiver fan it out. The bytes
  this saves are counted in ``minimoe.parallel.node_limited``.
* No overlap of communication and compute, no FP8 dispatch (``minimoe.parallel.comm``
  does the arithmetic of both), no capacity across ranks (capacity, when configured, is per
  rank: each rank applies ``capacity_factor`` to its own tokens).

Backend: gloo on CPU (what the tests use), NCCL on CUDA; ``pick_backend`` chooses from what
is available. The counts always travel on the tokens' device.
"""

from __future__ import annotations

import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from minimoe.experts import RoutedExperts
from minimoe.moe import MoE, grouped_mm_backend, grouped_swiglu

EXPERT_PARAMETERS = ("gate_proj", "up_proj", "down_proj")


def pick_backend() -> tuple[str, torch.device]:
    """("nccl", cuda device) when CUDA and NCCL are available, else ("gloo", cpu)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl", torch.device("cuda")
    return "gloo", torch.device("cpu")


class CommTimer:
    """Seconds spent inside the all-to-alls, forward and backward (for ``minimoe.parallel.bench``).

    Set ``expert_parallel.comm_timer = CommTimer()`` to measure; None (the default) costs
    nothing. The backward all-to-all runs inside autograd, so it is timed by two marks: an
    identity after the collective (its backward runs just before the collective's backward)
    and one before it (its backward runs just after)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.bytes_sent = 0
        self._started = None

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        self.seconds += time.perf_counter() - self._started


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``callback`` (a timer's start or stop)."""

    @staticmethod
    def forward(ctx, tensor, callback):
        ctx.callback = callback
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


comm_timer: Optional[CommTimer] = None


def all_to_all_rows(rows: torch.Tensor, recv_splits: list, send_splits: list, group) -> torch.Tensor:
    """Exchange blocks of rows: rows (sum send_splits, C) -> (sum recv_splits, C).

    Block d of ``rows`` (send_splits[d] rows) goes to rank d; block s of the result came
    from rank s. Differentiable when autograd records (its backward swaps the splits)."""
    timer = comm_timer
    if timer is not None:
        timer.bytes_sent += rows.element_size() * rows.shape[1] * (
            sum(send_splits) - send_splits[dist.get_rank(group)])
        timer.start()
    received = rows.new_empty(sum(recv_splits), rows.shape[1])  # (R, C)
    if torch.is_grad_enabled() and rows.requires_grad:
        from torch.distributed.nn.functional import all_to_all_single

        if timer is not None:
            rows = _Mark.apply(rows, timer.stop)  # backward: the collective's backward ended
        with warnings.catch_warnings():  # its deprecation notice names a private successor
            warnings.simplefilter("ignore", FutureWarning)
            received = all_to_all_single(received, rows.contiguous(), recv_splits, send_splits,
                                         group=group)  # (R, C)
        if timer is not None:
            received = _Mark.apply(received, timer.start)  # backward: it is about to start
    else:
        dist.all_to_all_single(received, rows.contiguous(), recv_splits, send_splits, group=group)
    if timer is not None:
        timer.stop()
    return received  # (R, C)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts (E,) slots this rank routes to each expert -> (W, E/W): rows each source rank
    will send to each of this rank's experts. An all-to-all with equal splits."""
    world = dist.get_world_size(group)
    received = torch.empty_like(counts)  # (E,)
    if comm_timer is not None:
        comm_timer.start()
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    if comm_timer is not None:
        comm_timer.stop()
    return received.view(world, -1)  # (W, E/W)


def expert_parallel_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                             local_experts: RoutedExperts, group,
                             mask: Optional[torch.Tensor] = None,
                             backend: Optional[str] = None) -> torch.Tensor:
    """``minimoe.moe.dispatch_sorted`` with the experts spread over the ranks of ``group``.

    x (N, C) this rank's tokens; topk_idx (N, k) *global* expert indices in [0, E);
    topk_weight (N, k); local_experts holds experts [rank*E/W, (rank+1)*E/W); mask (N, k)
    or None. Returns (N, C) in promote(x.dtype, topk_weight.dtype). Every rank of the group
    must call it (collectives), also a rank with N = 0.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local_count = local_experts.num_experts
    n_experts = local_count * world
    N, C = x.shape
    k = topk_idx.shape[1]

    # 1. one entry per computed slot, sorted by global expert = by destination rank
    slot = torch.arange(N * k, device=x.device)  # (N*k,)
    expert_of_slot = topk_idx.reshape(-1)  # (N*k,)
    if mask is not None:
        slot = slot[mask.reshape(-1)]  # (M,)
        expert_of_slot = expert_of_slot[slot]  # (M,)
    if expert_of_slot.numel() > 0 and int(expert_of_slot.max()) >= n_experts:
        raise ValueError(f"expert index {int(expert_of_slot.max())} >= {n_experts} experts "
                         f"({world} ranks x {local_count} local experts)")
    order = torch.argsort(expert_of_slot, stable=True)  # (M,)
    sorted_slot = slot[order]  # (M,)
    token = sorted_slot // k  # (M,) the token each sorted row came from
    weight = topk_weight.reshape(-1)[sorted_slot]  # (M,) stays on this rank
    counts = torch.bincount(expert_of_slot, minlength=n_experts)  # (E,)

    # 2. counts first: how many rows each rank will receive from each source
    received_counts = exchange_counts(counts, group)  # (W, E/W)
    send_splits = counts.view(world, local_count).sum(1).tolist()  # (W,) rows to each rank
    recv_splits = received_counts.sum(1).tolist()  # (W,) rows from each rank

    # 3. dispatch: the token rows travel to their experts' ranks
    rows = x.index_select(0, token)  # (M, C)
    received = all_to_all_rows(rows, recv_splits, send_splits, group)  # (R, C) source-major

    # 4. regroup source-major rows by local expert; run every local expert on its block
    local_expert_of_row = torch.arange(local_count, device=x.device).repeat(world)  # (W*E/W,)
    local_expert_of_row = local_expert_of_row.repeat_interleave(received_counts.reshape(-1))  # (R,)
    by_expert = torch.argsort(local_expert_of_row, stable=True)  # (R,)
    rows_per_expert = received_counts.sum(0)  # (E/W,)
    if backend is None:
        backend = grouped_mm_backend(x.device, x.dtype, C, local_experts.intermediate_size)
    expert_out = grouped_swiglu(received[by_expert], rows_per_expert, local_experts, backend)  # (R, C)
    source_major = torch.empty_like(expert_out).index_copy(0, by_expert, expert_out)  # (R, C)

    # 5. combine: results travel back (splits swapped), then weight and add on the token's rank
    returned = all_to_all_rows(source_major, send_splits, recv_splits, group)  # (M, C)
    out_dtype = torch.promote_types(x.dtype, topk_weight.dtype)
    out = torch.zeros(N, C, dtype=out_dtype, device=x.device)  # (N, C)
    return out.index_add_(0, token, returned.to(out_dtype) * weight.unsqueeze(-1).to(out_dtype))


class ExpertParallelMoE(MoE):
    """minimoe's MoE with its routed experts sharded over a process group.

    Same submodules and names as ``minimoe.moe.MoE`` (gate, experts, shared_experts), so
    everything that reads an MoE -- the decoder block, the balance losses, the bias update
    -- works unchanged. ``experts`` holds this rank's E / W experts, rank r owning global
    experts [r*E/W, (r+1)*E/W); the router and shared experts are full replicas.
    ``update_expert_bias`` sums the load counters over the group first, so every replica of
    the router moves its bias by the same step (DeepSeek-V3 §2.1.2 counts the whole batch).
    """

    def __init__(self, cfg, group=None) -> None:
        super().__init__(cfg)  # builds all E experts once; replaced by this rank's share below
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if cfg.n_routed_experts % world != 0:
            raise ValueError(f"n_routed_experts={cfg.n_routed_experts} cannot be split evenly "
                             f"over {world} expert-parallel ranks")
        self.world_size, self.rank = world, rank
        self.local_count = cfg.n_routed_experts // world
        self.first_expert = rank * self.local_count
        self.experts = RoutedExperts(self.local_count, cfg.hidden_size, cfg.moe_intermediate_size,
                                     init_std=cfg.initializer_range)

    def routed_output(self, x, topk_idx, topk_weight, mask):
        return expert_parallel_dispatch(x, topk_idx, topk_weight, self.experts, self.group,
                                        mask=mask)  # (N, C)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        dist.all_reduce(self.tokens_per_expert, group=self.group)  # (E,) the whole batch's load
        super().update_expert_bias()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}/{self.world_size}, "
                f"experts={self.first_expert}..{self.first_expert + self.local_count - 1}")


# ----------------------------------------------------------------------------------------------
# Sharding a single-process model and gathering it back
# ----------------------------------------------------------------------------------------------
def shard_moe(moe: MoE, group=None) -> ExpertParallelMoE:
    """An ExpertParallelMoE holding ``moe``'s router, shared experts and this rank's experts."""
    parallel = ExpertParallelMoE(moe.cfg, group)
    state = moe.state_dict()
    start, stop = parallel.first_expert, parallel.first_expert + parallel.local_count
    for name in EXPERT_PARAMETERS:
        state[f"experts.{name}"] = state[f"experts.{name}"][start:stop]  # (E/W, ., .)
    parallel.load_state_dict(state, strict=True)
    parallel.train(moe.training)
    return parallel.to(next(moe.parameters()).device)


def to_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Replace every MoE inside ``model`` (main layers and MTP blocks) by its EP shard, in place.

    Build the model the single-process way (same seed, same weights on every rank), then
    call this: each rank keeps the router and shared experts and its own E / W experts."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                setattr(parent, child_name, shard_moe(child, group))
                replaced += 1
    if replaced == 0:
        raise ValueError("to_expert_parallel: the model has no MoE layer to shard")
    return model


def gather_state_dict(model: nn.Module) -> dict:
    """The single-process state dict of a model with ExpertParallelMoE layers.

    Every rank must call it (all-gathers); each rank gets the full dict, expert tensors
    concatenated in rank order back to (E, ., .)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, ExpertParallelMoE):
            continue
        for tensor_name in EXPERT_PARAMETERS:
            key = f"{name}.experts.{tensor_name}"
            local = state[key].contiguous()  # (E/W, ., .)
            pieces = [torch.empty_like(local) for _ in range(module.world_size)]
            dist.all_gather(pieces, local, group=module.group)
            state[key] = torch.cat(pieces)  # (E, ., .)
    return state


def expert_parameter_names(model: nn.Module) -> set:
    """Names of the parameters that are sharded (differ per rank); the rest are replicas."""
    return {f"{name}.experts.{tensor_name}" for name, module in model.named_modules()
            if isinstance(module, ExpertParallelMoE) for tensor_name in EXPERT_PARAMETERS}
