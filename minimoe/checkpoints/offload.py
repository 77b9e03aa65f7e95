"""Expert offloading: routed experts stay on disk and are read on demand through an LRU cache.

The idea
--------
In an MoE model almost all parameters are routed experts (DeepSeek-V3: 656B of 671B), and
each token uses only top_k of them per layer (8 of 256). A model too large for memory can
still run if the experts stay on disk and only the ones the router picks are brought in:

    load_pretrained(path, offload_experts=True, expert_cache_size=N)

keeps every weight except the routed experts in memory as usual and replaces each MoE
layer's ``RoutedExperts`` by ``OffloadedExperts``. Its ``expert_forward(e, x)`` -- the one
call ``minimoe.moe.dispatch_naive`` makes per expert that received tokens -- asks the shared
``ExpertStore`` for expert e's three matrices:

* The store keeps every shard open with safetensors' ``safe_open``, which memory-maps the
  file: reading one tensor touches only that tensor's bytes.
* An LRU cache (least recently used, Python's ``OrderedDict``) holds at most N experts,
  counted across all layers. A *hit* returns the cached matrices; a *miss* reads the three
  tensors (dequantising FP8 blocks if the checkpoint has scales), converts them to the
  model's dtype and device, and evicts the least recently used expert when the cache is full.
* ``store.stats()`` reports hits, misses, evictions and the bytes read from disk.

The math is unchanged: the same gate, up and down matrices reach the same SwiGLU, so the
logits equal those of a normal load (the tests check it). Only the dispatch differs: the
grouped-matmul path (``dispatch_sorted``) wants all experts stacked in memory, so an
offloaded model uses the per-expert loop ``dispatch_naive`` (``cfg.dispatch = "naive"``).

Cost. Decoding one token reads top_k experts per layer. DeepSeek-V3 in bfloat16: an expert
is 3 x 7168 x 2048 x 2 bytes = 88 MB, so a step with all misses reads 58 layers x 8 x 88 MB
= 41 GB -- seconds to minutes per token from an SSD. The cache turns repeated experts (the
router's favourites, a prompt's recurring topics) into hits; hit rate is the whole game.

What the reader should notice
-----------------------------
* Sparsity is what makes this possible at all: a dense model has no small working set.
* The cache is counted in experts because an expert is the unit the router chooses; its
  hit/miss sequence is fully determined by the routing (a test replays the router's choices
  through an independent LRU and gets the same counts).
* Inference only: the offloaded matrices are not parameters and get no gradients.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimoe.checkpoints.shards import CheckpointFiles
from minimoe.experts import RoutedExperts

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ExpertStore:
    """Expert matrices on disk (memory-mapped shards) behind one LRU cache of ``capacity`` experts.

    sources: {(module name, expert): {projection: (tensor name, shard file)}}.
    """

    def __init__(self, files: CheckpointFiles,
                 sources: dict[tuple[str, int], dict[str, tuple[str, str]]], capacity: int,
                 device: torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"expert_cache_size must be >= 1 (experts), got {capacity}")
        # the shards stay open (memory maps); FP8 experts are dequantised on each read
        self.files = dataclasses.replace(files, caller="load_pretrained(offload_experts=True)",
                                         handles={})
        self.sources = sources
        self.capacity = capacity
        self.dtype = files.dtype
        self.device = device
        self.cache: OrderedDict = OrderedDict()  # (module, expert) -> (gate, up, down)
        self.hits = self.misses = self.evictions = self.bytes_loaded = 0
        # set to [] to record every request (module, expert) in order; None = no record (a
        # long generation with a large model would otherwise grow it without bound)
        self.trace: Optional[list[tuple[str, int]]] = None

    def _read(self, tensor_name: str, file_name: str) -> torch.Tensor:
        tensor, nbytes = self.files.read(tensor_name)
        self.bytes_loaded += nbytes
        return tensor.to(device=self.device, dtype=self.dtype, copy=True)  # own aligned memory

    def shape(self, tensor_name: str, file_name: str) -> tuple:
        """A tensor's shape from the file header, without reading its bytes."""
        return self.files.shape(tensor_name)

    def get(self, module: str, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``expert`` of MoE module ``module``: (gate (I, C), up (I, C), down (C, I))."""
        key = (module, expert)
        if self.trace is not None:
            self.trace.append(key)
        if key in self.cache:
            self.hits += 1
            self.cache.move_to_end(key)  # now the most recently used
            return self.cache[key]
        self.misses += 1
        names = self.sources[key]
        weights = tuple(self._read(*names[p]) for p in PROJECTIONS)
        self.cache[key] = weights
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)  # the least recently used
            self.evictions += 1
        return weights

    def stats(self) -> dict:
        requests = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "bytes_loaded": self.bytes_loaded, "cached_experts": len(self.cache),
                "capacity": self.capacity,
                "hit_rate": self.hits / requests if requests else 0.0}

    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = self.bytes_loaded = 0
        if self.trace is not None:
            self.trace.clear()

    def close(self) -> None:
        self.files.close()
        self.cache.clear()


class OffloadedExperts(nn.Module):
    """Stands in for ``RoutedExperts`` (same num_experts, hidden_size, intermediate_size and
    expert_forward); the matrices come from an ``ExpertStore``. No parameters."""

    def __init__(self, store: ExpertStore, module_name: str, num_experts: int, hidden_size: int,
                 intermediate_size: int) -> None:
        super().__init__()
        self.store = store
        self.module_name = module_name
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on its tokens: x (n, C) -> (n, C), as RoutedExperts does."""
        gate_proj, up_proj, down_proj = self.store.get(self.module_name, int(e))
        gate = x @ gate_proj.T  # (n, C) @ (C, I) -> (n, I)
        up = x @ up_proj.T  # (n, I)
        hidden = F.silu(gate) * up  # (n, I)
        return hidden @ down_proj.T  # (n, I) @ (I, C) -> (n, C)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, offloaded (cache "
                f"{self.store.capacity} experts)")


def attach_offloaded_experts(model: nn.Module, files: CheckpointFiles,
                             expert_plan: dict[str, tuple[str, int]], capacity: int,
                             device: torch.device) -> ExpertStore:
    """Replace every RoutedExperts of ``model`` by an OffloadedExperts reading from disk.

    expert_plan: {checkpoint tensor name: (stacked minimoe name "….experts.gate_proj", expert)}
    as ``minimoe.checkpoints.load`` maps them. Every expert's three matrices must be in the plan with
    the shapes the model expects (KeyError / ValueError naming the tensor and file otherwise).
    Returns the store (also at ``model.expert_store``).
    """
    sources: dict[tuple[str, int], dict[str, tuple[str, str]]] = {}
    for tensor_name, (stacked, expert) in expert_plan.items():
        module_name, projection = stacked.rsplit(".", 1)
        sources.setdefault((module_name, expert), {})[projection] = (
            tensor_name, files.weight_map[tensor_name])
    store = ExpertStore(files, sources, capacity, device)
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, RoutedExperts):
            continue
        E, C, I = module.num_experts, module.hidden_size, module.intermediate_size
        wanted = {"gate_proj": (I, C), "up_proj": (I, C), "down_proj": (C, I)}
        for e in range(E):
            found = sources.get((module_name, e), {})
            for projection in PROJECTIONS:
                if projection not in found:
                    raise KeyError(f"load_pretrained(offload_experts=True): expert {e} "
                                   f"{projection} of {module_name} is not in the checkpoint "
                                   f"{files.folder}")
                tensor_name, file_name = found[projection]
                shape = store.shape(tensor_name, file_name)
                if shape != wanted[projection]:
                    raise ValueError(f"load_pretrained: {tensor_name} (in {file_name}) has shape "
                                     f"{shape}; the model built from config.json expects "
                                     f"{wanted[projection]}")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, OffloadedExperts(store, module_name, E, C, I))
    model.expert_store = store
    return store


def offload_stats(model: nn.Module) -> Optional[dict]:
    """The expert store's counters of an offloaded model (None for a normal one)."""
    store = getattr(model, "expert_store", None)
    return None if store is None else store.stats()


def folder_size_bytes(folder: str) -> int:
    """Bytes of the *.safetensors files in folder (to compare with what offloading read)."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
               if n.endswith(".safetensors"))
