"""KV cache: what a decoder keeps from earlier tokens so each new token costs O(T), not O(T^2).

The idea
--------
At decoding step t, attention needs the keys and values of every earlier position. They
do not change once computed (causal attention: a token never sees the future), so we keep
them. What exactly is kept differs by attention kind, and that difference is the whole
point of MLA (DeepSeek-V2 §2.1):

* MHA / GQA keep per-head keys and values: 2 * n_kv_heads * head_dim numbers per token
  per layer (GQA shares each K/V head among several query heads to shrink this);
* MLA keeps the compressed latent c_kv (kv_lora_rank numbers) and the shared RoPE key
  k_pe (qk_rope_head_dim numbers) and rebuilds K and V from them.

This class is deliberately generic: a layer stores any named tensors of shape
(B, T, ...), time on dim 1. ``append`` concatenates along time and
returns the full history; ``truncate`` rolls the cache back (speculative decoding rejects
drafted tokens that way).
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer named tensors of shape (B, T, ...), grown along the time axis (dim 1)."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.length = 0  # tokens already in the cache (same for every layer)

    def append(self, layer_index: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add new entries (B, T_new, ...) for one layer; return the whole history (B, T_all, ...)."""
        stored = self.layers[layer_index]
        for name, tensor in new.items():
            if name in stored:
                stored[name] = torch.cat([stored[name], tensor], dim=1)  # (B, T_all, ...)
            else:
                stored[name] = tensor
        return dict(stored)

    def advance(self, num_tokens: int) -> None:
        """Called once per model forward, after every layer appended num_tokens entries."""
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (rollback of rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate length {length} outside [0, {self.length}]")
        for stored in self.layers:
            for name in stored:
                stored[name] = stored[name][:, :length]
        self.length = length

    def num_elements_per_token(self) -> int:
        """Cached numbers per token summed over layers (batch 1), for the memory lessons."""
        total = 0
        for stored in self.layers:
            for tensor in stored.values():
                total += tensor[0, 0].numel() if tensor.shape[1] > 0 else 0
        return total
