"""A pre-allocated KV cache and a decode step compiled once: decoding at compiled speed.

Why
---
At batch 1 a decode step of a small model does very little arithmetic: one token through
every layer. On a CPU (and on a GPU without CUDA graphs) its time goes to the Python
interpreter and to launching hundreds of tiny operators. torch.compile removes most of
that: it fuses the elementwise work into a few generated kernels and runs the whole step
as one call. But a compiled graph is specialised to the shapes it saw. The growing cache
of ``minimoe.cache.KVCache`` (``torch.cat`` along time) changes the key length at every
step, so a compiled step would be recompiled at every step.

The remedy is gpt-fast's ("Accelerating Generative AI with PyTorch II: GPT, Fast", PyTorch
blog, 2023): allocate the cache once at its final size and never change a shape.

    buffer_l   = zeros(B, L_max, ...)            per layer and per cached tensor
    write:       buffer_l[:, positions] = new    (index_copy_ along time)
    attend:      scores over all L_max slots, with
                 allowed[i, j] = (j <= positions[i])          (T, L_max)

The slots after the current position hold zeros or stale entries of rejected drafts;
the mask hides them, so the result equals attention over the true history. Every tensor
in the step now has the same shape at every call: the step is compiled once (per number
of new tokens T: 1 for plain decoding, 1 + drafts for speculative verification) and
replayed. The position enters as a tensor, not a Python int, so the compiled code does
not depend on it either.

What is cached is what the attention module appends: per-head keys and values for MHA and
GQA (``minimoe.attention``), the latent c_kv and the shared rope key k_pe for MLA
(``minimoe.mla``). MLA decodes here in its "absorbed" mode (DeepSeek-V2 §2.1.2): scores
against the cached latent directly, which costs O(L_max * (d_c + d_rope)) per head instead
of rebuilding every cached key and value ("latent" mode) at every step.

The MoE layers decode with ``minimoe.moe.dispatch_gather`` (each token-slot multiplies by
its own expert's gathered matrices) whenever a step has no more slots than routed experts:
its shapes are fixed by the step's size, where the sorted dispatch's grouped matmul loops
over all E experts, most of them idle at one token per sequence (``DecodeModes``).

Rolling back (speculative decoding rejects drafts) is only ``length = n``: the rejected
entries stay in their slots, masked, until a later write replaces them.

Greedy speculative decoding with one draft (DeepSeek-V3's setting: one MTP module) goes one
step further (``GreedyOneDraft``): the main model's verify pass, the acceptance test and the
MTP module's pass that drafts the next token are one compiled function,
``verify_and_draft``. The module reads, at each verified position, the main model's own
greedy token after it -- the accepted draft, or the bonus token -- so the drafting needs
no second trip through Python; a step costs one call that returns four integers.

What the reader should notice
-----------------------------
* Nothing about the model changes: the same modules run, with a different cache object.
  Attention asks the cache for its mask (``minimoe.attention.static_cache_mask``).
* The prompt (prefill) runs eagerly through the same code: its length differs for every
  prompt, and compiling each length would cost more than it saves. Only the decode step,
  run hundreds of times with one shape, is compiled.
* Greedy output equals ``model.generate`` (tests/test_compile_decode.py); the logits agree
  to float rounding, since fused kernels sum in a different order.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace
from typing import Optional

import torch

from minimoe.generate import check_request, decode_loop
from minimoe.mla import MultiHeadLatentAttention
from minimoe.moe import MoE
from minimoe.mtp import first_input

# Every distinct shape (batch, T, cache length) and every model is one more compiled graph of
# the same step function; PyTorch's default of 8 would silently fall back to eager mode.
RECOMPILE_LIMIT = 64
LENGTH_MULTIPLE = 64  # cache lengths are rounded up so that nearby requests share a graph


class StaticKVCache:
    """Per-layer named tensors (B, max_length, ...), written in place at ``positions``.

    The same interface as ``minimoe.cache.KVCache`` (``layers``, ``length``, ``append``,
    ``truncate``), plus ``positions`` (set by the caller before each forward) and
    ``attention_mask``. ``advance`` does nothing: ``StaticDecoder`` and ``StaticDraft`` move
    ``length`` outside the compiled step, so the compiled code never reads a Python counter.
    """

    def __init__(self, batch_size: int, max_length: int) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"StaticKVCache needs batch_size, max_length >= 1, got "
                             f"{batch_size}, {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.layers: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        self.length = 0  # tokens written and kept
        self.positions: Optional[torch.Tensor] = None  # (T,) long: where the next write goes

    def start_write(self, num_tokens: int, device) -> torch.Tensor:
        """Positions length .. length + num_tokens - 1 for the next forward; returns them (T,)."""
        if self.length + num_tokens > self.max_length:
            raise ValueError(f"StaticKVCache holds {self.max_length} positions; "
                             f"{self.length} + {num_tokens} new tokens do not fit")
        self.positions = torch.arange(self.length, self.length + num_tokens, device=device)
        return self.positions

    def append(self, layer_index: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write new entries (B, T, ...) at ``positions``; return the full buffers (B, L, ...)."""
        stored = self.layers[layer_index]
        for name, tensor in new.items():
            if name not in stored:  # first write (the eager prefill): allocate once
                stored[name] = tensor.new_zeros(self.batch_size, self.max_length, *tensor.shape[2:])
            stored[name].index_copy_(1, self.positions, tensor)  # (B, L, ...) in place
        return dict(stored)

    def attention_mask(self) -> torch.Tensor:
        """(T, max_length) bool: query i may see slot j iff j <= positions[i]."""
        slots = torch.arange(self.max_length, device=self.positions.device)  # (L,)
        return slots[None, :] <= self.positions[:, None]  # (T, L)

    def advance(self, num_tokens: int) -> None:
        """Accepted for KVCache compatibility; the decoders move ``length`` themselves."""

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (later slots stay, masked, until overwritten)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate length {length} outside [0, {self.length}]")
        self.length = length


class DecodeModes:
    """How the modules of `model` compute while decoding (the function does not change).

    * every MLA module runs "absorbed" (scores against the cached latent, see above);
    * every MoE layer on the sorted dispatch runs ``minimoe.moe.dispatch_gather`` when a
      step has no more token-slots than routed experts (batch * T * k <= E): each slot reads
      its own expert's matrices, with shapes fixed by the step's size, instead of sorting.
    The modules are listed once, so entering costs a few attribute writes per step.
    """

    def __init__(self, model) -> None:
        self.mla = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
        self.moe = [m for m in model.modules() if isinstance(m, MoE)]

    @contextlib.contextmanager
    def __call__(self, num_tokens: int):
        """Inside the block: the decoding modes for a step of num_tokens tokens (batch * T)."""
        saved = [m.mla_mode for m in self.mla], [m.dispatch_override for m in self.moe]
        for module in self.mla:
            module.mla_mode = "absorbed"
        for layer in self.moe:
            # a layer on the naive loop stays there (offloaded experts are not stacked in
            # memory); otherwise None, not "unchanged": these modes may be nested in another's
            few_slots = num_tokens * layer.top_k <= layer.n_routed_experts
            layer.dispatch_override = ("gather" if layer.cfg.dispatch == "sorted" and few_slots
                                       else None)
        try:
            yield
        finally:
            for module, mode in zip(self.mla, saved[0]):
                module.mla_mode = mode
            for layer, override in zip(self.moe, saved[1]):
                layer.dispatch_override = override


def main_step(model, input_ids: torch.Tensor, cache: StaticKVCache):
    """The main model over T new tokens at ``cache.positions``: (logits (B, T, V), hidden (B, T, C)).

    ``Transformer.forward`` without targets and balance statistics: embedding, the layers
    (each writes its slots of the cache), the final norm and the output head."""
    positions = cache.positions  # (T,)
    x = model.embed_tokens(input_ids)  # (B, T, C)
    for layer in model.layers:
        x, _ = layer(x, positions, cache)  # (B, T, C)
    return model.lm_head(model.norm(x)), x  # (B, T, V), (B, T, C)


def draft_step(module, previous_hidden, embeddings, cache: StaticKVCache):
    """One MTP module (``minimoe.mtp.MTPModule``) over its pending positions: (B, P, C)."""
    hidden, _ = module(previous_hidden, embeddings, cache.positions, cache=cache)
    return hidden  # (B, P, C)


def compiled(function, device_type: str = "cpu"):
    """torch.compile(function) with fixed shapes (one graph per shape, never a dynamic one).

    On a CPU the generated code is called from a C++ wrapper (inductor's ``cpp_wrapper``)
    rather than from Python: a decode step of a small model launches a few hundred tiny
    kernels, and the Python wrapper's per-kernel call cost was a third of the step's time
    (0.92 -> 0.56 ms per step on the toy, 2 CPU cores; the compile time is unchanged)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(function, dynamic=False, options=options)


_COMPILED: dict = {}


def _compiled_step(function, device_type: str):
    """One compiled wrapper per step function and device type for the whole process."""
    if (function, device_type) not in _COMPILED:
        _COMPILED[function, device_type] = compiled(function, device_type)
    return _COMPILED[function, device_type]


def _device_type(module) -> str:
    return next(module.parameters()).device.type


def round_up_length(length: int) -> int:
    return -(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


class StaticDecoder:
    """Calls like the model on new tokens -- ``decoder(ids, cache=decoder.cache)`` -- and
    returns ``.logits`` (B, T, V) and ``.hidden`` (B, T, C). The first call (the prompt) runs
    eagerly; the later ones run the compiled ``main_step`` when ``compile`` is True."""

    def __init__(self, model, batch_size: int, max_length: int, compile: bool = True) -> None:
        self.model = model
        self.cache = StaticKVCache(batch_size, round_up_length(max_length))
        self.step = _compiled_step(main_step, _device_type(model)) if compile else main_step
        self.modes = DecodeModes(model)

    def __call__(self, input_ids: torch.Tensor, cache: Optional[StaticKVCache] = None):
        if cache is not None and cache is not self.cache:
            raise ValueError("a StaticDecoder runs on its own cache (decoder.cache)")
        self.cache.start_write(input_ids.shape[1], input_ids.device)
        step = self.step if self.cache.length > 0 else main_step  # prefill: eager
        with self.modes(input_ids.numel()):
            logits, hidden = step(self.model, input_ids, self.cache)
        self.cache.length += input_ids.shape[1]
        return SimpleNamespace(logits=logits, hidden=hidden)


class StaticDraft:
    """An MTP module over its own StaticKVCache, called like the module itself:
    ``draft(previous_hidden, embeddings, positions, cache=draft.cache)`` -> (hidden, None)."""

    def __init__(self, module, max_length: int, compile: bool = True) -> None:
        self.module = module
        self.cache = StaticKVCache(1, round_up_length(max_length))
        self.step = (_compiled_step(draft_step, _device_type(module)) if compile
                     else draft_step)
        self.modes = DecodeModes(module)

    def __call__(self, previous_hidden, embeddings, positions, cache=None):
        if cache is not None and cache is not self.cache:
            raise ValueError("a StaticDraft runs on its own cache (draft.cache)")
        count = embeddings.shape[1]
        self.cache.start_write(count, embeddings.device)
        step = self.step if self.cache.length > 0 else draft_step  # the first call: eager
        # the inputs are often slices of longer tensors, whose strides change from call to
        # call (even along a dimension of size 1, which `contiguous()` leaves alone); a graph
        # is specialised to its inputs' strides, so hand it copies with the standard ones
        previous_hidden, embeddings = (t.clone(memory_format=torch.contiguous_format)
                                       for t in (previous_hidden, embeddings))
        with self.modes(embeddings.shape[0] * count):
            hidden = step(self.module, previous_hidden, embeddings, self.cache)
        self.cache.length += count
        return hidden, None

    def logits(self, hidden, lm_head):
        return self.module.logits(hidden, lm_head)

    @property
    def final_norm(self):  # what the next depth reads (minimoe.mtp.next_input)
        return self.module.final_norm


def speculative_parts(model, modules: list, max_length: int, compile: bool = True):
    """For ``minimoe.speculative``: (main decoder, its cache, drafters, their caches)."""
    main = StaticDecoder(model, 1, max_length, compile)
    drafts = [StaticDraft(module, max_length, compile) for module in modules]
    return main, main.cache, drafts, [draft.cache for draft in drafts]


def verify_and_draft(model, module, verify_ids: torch.Tensor, main_cache: StaticKVCache,
                     draft_cache: StaticKVCache) -> torch.Tensor:
    """One step of greedy speculative decoding with one draft, as one graph.

    verify_ids (1, 2) = [t_{N-1}, d_1], written at positions N-1, N of both caches. The main
    model verifies d_1; the MTP module then runs on the same two positions, reading
    (h^0_i, Emb(the main model's greedy token after i)) -- at i = N-1 + accepted that token
    is the bonus token, before it the accepted draft -- and drafts the next step's d_1 at
    i = N-1 + accepted. Entries past that position are rolled back by the caller (their
    inputs were a rejected draft). Returns (4,) long: accepted (0 or 1), the main model's
    greedy token after t_{N-1} and after d_1, and the next draft.
    """
    logits, hidden = main_step(model, verify_ids, main_cache)  # (1, 2, V), (1, 2, C)
    targets = logits[0].argmax(dim=-1)  # (2,) greedy token after each input
    accepted = (targets[0] == verify_ids[0, 1]).long()  # () 1 iff the main model chose d_1
    next_draft = greedy_draft(model, module, hidden, targets[None], draft_cache,
                              at=accepted.view(1))  # () drafted at N-1 + accepted
    return torch.cat([accepted.view(1), targets, next_draft.view(1)])  # (4,)


def greedy_draft(model, module, hidden: torch.Tensor, following: torch.Tensor,
                 draft_cache: StaticKVCache, at: torch.Tensor) -> torch.Tensor:
    """The MTP module over positions ``draft_cache.positions`` (writing its cache), reading
    h^0_i (main-model states hidden (1, P, C)) and Emb(t_{i+1}) (following (1, P)); its greedy
    draft at position index ``at`` (1,) long: a () token id."""
    h, _ = module(first_input(model, hidden), model.embed_tokens(following),
                  draft_cache.positions, cache=draft_cache)  # (1, P, C)
    state = h.index_select(1, at)  # (1, 1, C)
    return module.logits(state, model.lm_head)[0, 0].argmax()  # ()


class GreedyOneDraft:
    """Greedy speculative decoding with one MTP draft per step, one compiled call per step.

    ``minimoe.speculative.speculative_generate`` takes this path for compile=True,
    temperature 0 and one draft: its general loop makes the main pass, the acceptance and
    the module's pass three trips through Python per step, which on a small model cost as
    much as the passes themselves. Here ``verify_and_draft`` does all three, so a step
    costs one call returning four integers. Same tokens, same caches as the general loop.
    """

    def __init__(self, model, max_length: int, compile: bool = True) -> None:
        self.model, self.module = model, model.mtp[0]
        length = round_up_length(max_length)
        self.main_cache, self.draft_cache = StaticKVCache(1, length), StaticKVCache(1, length)
        self.step = (_compiled_step(verify_and_draft, _device_type(model)) if compile
                     else verify_and_draft)
        self.modes = DecodeModes(model)  # (the model's modules include its MTP modules)
        self._step_modes = None

    def __enter__(self) -> "GreedyOneDraft":
        """The decoding modes of a 2-token step, set once for the whole run (restored on exit)."""
        self._step_modes = self.modes(2)
        self._step_modes.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._step_modes.__exit__(*exc)
        self._step_modes = None

    def prefill(self, input_ids: torch.Tensor) -> tuple[int, int]:
        """The prompt (1, T), eagerly: (first new token, the first draft after it)."""
        model, T = self.model, input_ids.shape[1]
        self.main_cache.start_write(T, input_ids.device)
        self.draft_cache.start_write(T, input_ids.device)
        with self.modes(T):
            logits, hidden = main_step(model, input_ids, self.main_cache)  # (1, T, V), (1, T, C)
            first = logits[0, -1].argmax().view(1, 1)  # (1, 1)
            following = torch.cat([input_ids[:, 1:], first], dim=1)  # (1, T) t_{i+1}
            last = torch.tensor([T - 1], device=input_ids.device)  # (1,)
            draft = greedy_draft(model, self.module, hidden, following, self.draft_cache, last)
        self.main_cache.length = self.draft_cache.length = T
        return int(first), int(draft)

    def __call__(self, last_token: int, draft: int) -> tuple[int, int, int]:
        """Verify `draft` after `last_token`: (accepted 0/1, next token, next draft)."""
        if self._step_modes is None:
            raise RuntimeError("run GreedyOneDraft steps inside `with GreedyOneDraft(...) as run:`")
        verify_ids = torch.tensor([[last_token, draft]],
                                  device=self.model.embed_tokens.weight.device)  # (1, 2)
        for cache in (self.main_cache, self.draft_cache):
            cache.start_write(2, verify_ids.device)
        accepted, after_last, after_draft, next_draft = self.step(
            self.model, self.module, verify_ids, self.main_cache, self.draft_cache).tolist()
        for cache in (self.main_cache, self.draft_cache):
            cache.length += 1 + accepted  # keep t_{N-1} and an accepted draft
        return accepted, (after_last, after_draft)[accepted], next_draft


@torch.no_grad()
def generate_static(model, input_ids: torch.Tensor, max_new_tokens: int,
                    temperature: float = 0.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                    eos_token_id: Optional[int] = None, compile: bool = True) -> torch.Tensor:
    """``minimoe.generate.generate`` over a StaticKVCache with the compiled decode step."""
    check_request(model, input_ids, max_new_tokens)
    B, T = input_ids.shape
    decoder = StaticDecoder(model, B, T + max_new_tokens, compile)
    return decode_loop(model, lambda step_input, _: decoder(step_input).logits[:, -1], input_ids,
                       max_new_tokens, temperature, top_k, top_p, generator, eos_token_id)
