"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling.

The idea
--------
A language model gives p(t_{n+1} | t_1..t_n). Decoding picks a token, appends it and asks
again. Two costs matter:

* Recomputing attention over the whole prefix for every new token costs O(n^2) per token.
  A *KV cache* (``minimoe.cache``) keeps each layer's keys and values (MLA: the latent
  c_kv and the RoPE key) so a step only runs the new token through the model: the prompt
  is processed once ("prefill"), then one token per forward ("decode").
* How to pick the token. Greedy takes the argmax. Sampling draws from softmax(logits / tau):
  temperature tau < 1 sharpens, > 1 flattens. Top-k keeps the k most likely tokens; top-p
  (nucleus sampling, Holtzman et al. 2020 §3.1) keeps the smallest set whose probability
  reaches p. Both renormalise over what they keep.

What the reader should notice: the cache changes only the cost, never the result --
greedy output with the cache equals greedy output recomputing the whole prefix each step
(a test checks it). MoE routing is per token, so each decode step routes exactly one
token per sequence: at batch 1 every step touches only k + shared experts' weights.
"""

from __future__ import annotations

from typing import Optional

import torch

from minimoe.cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits (B, V)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth_value = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # (B, V)
        # drop a token if the tokens ranked before it already reach top_p (keeps >= 1 token)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p  # (B, V)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                    top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). temperature 0 = greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)  # (B, V)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def check_request(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Clear errors for a prompt that is not (batch, time), or a request past the positions."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, time) tensor, got "
                         f"{tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = model.cfg.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds max_position_embeddings ({limit})")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             use_cache: bool = True, generator: Optional[torch.Generator] = None,
             eos_token_id: Optional[int] = None) -> torch.Tensor:
    """Extend input_ids (B, T) by up to max_new_tokens tokens; returns (B, T + new).

    temperature 0 (the default) is greedy decoding. With use_cache=False every step reruns
    the whole sequence (the slow reference the cached path is tested against). Generation
    stops early when every sequence has produced eos_token_id.
    """
    check_request(model, input_ids, max_new_tokens)
    cache = KVCache(len(model.layers)) if use_cache else None

    def next_logits(step_input: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        if use_cache:
            return model(step_input, cache=cache).logits[:, -1]  # (B, V)
        return model(sequence).logits[:, -1]  # (B, V)

    return decode_loop(model, next_logits, input_ids, max_new_tokens, temperature, top_k, top_p,
                       generator, eos_token_id)


def decode_loop(model, next_logits, input_ids: torch.Tensor, max_new_tokens: int,
                temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator], eos_token_id: Optional[int]) -> torch.Tensor:
    """The sampling loop every decoder shares (this module's, ``minimoe.static_cache``'s).

    next_logits(step_input, sequence) -> (B, V): the logits after the new tokens step_input
    (the whole prompt first, then one token per row), given the sequence so far.
    """
    was_training = model.training
    model.eval()
    sequence = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_input = input_ids  # prefill with the whole prompt
    for _ in range(max_new_tokens):
        logits = next_logits(step_input, sequence)  # (B, V)
        next_token = pick_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished[:, None], eos_token_id)
            finished |= next_token[:, 0] == eos_token_id
        sequence = torch.cat([sequence, next_token], dim=1)  # (B, T + 1)
        step_input = next_token
        if eos_token_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return sequence
