"""Speculative decoding with the MTP modules as the draft model.

Why
---
At batch 1 a decoder is limited by reading weights, not by arithmetic: a forward pass over
k + 1 tokens costs hardly more than over one token (on a CPU toy, by the Python and kernel
launch overhead of every layer; on a GPU, by memory bandwidth). If a cheap *draft* model
guesses the next few tokens, ONE forward pass of the main model can check all of them at
once and keep every guess it agrees with. The output does not change -- only the number of
main-model passes per generated token does.

* Speculative decoding / speculative sampling (Leviathan, Kalman & Matias 2023, "Fast
  Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating
  Large Language Model Decoding with Speculative Sampling") use a separate small model.
* Medusa (Cai et al. 2024) adds extra heads on the main model's last hidden state, each
  guessing one more token ahead, *in parallel*; EAGLE (Li et al. 2024) drafts with one
  light autoregressive layer over the main model's features.
* DeepSeek-V3 (§2.2 and §5.4.3) trains D multi-token-prediction modules (``minimoe.mtp``)
  for a denser training signal, and notes that they can be reused as the draft model at
  inference: the second token is accepted 85-90% of the time, giving about 1.8x the tokens
  per second. An MTP module is EAGLE-like -- one transformer block fed with the main
  model's hidden state and the embedding of the next token -- and sequential over depths,
  so module k conditions on module k-1's output and on the tokens drafted before it.

One decoding step (batch 1)
---------------------------
The sequence holds N tokens t_0..t_{N-1}; the main model's KV cache holds positions
0..N-2 and its last hidden states h^0 (the bonus token t_{N-1} of the previous step has
not been through the main model yet).

1. Draft. Module k at position i reads h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}.
   At i = N-2, module 1 reads h^0_{N-2} and Emb(t_{N-1}) and drafts d_1 = t_N; module 2
   reads h^1_{N-2} and Emb(d_1) and drafts d_2 = t_{N+1}; and so on for k = 1..D. Each
   module attends over its own earlier positions, so each keeps its *own* KV cache (for MLA
   the latent c_kv and the rope key, exactly like a main layer). Optionally the last module
   is applied again to draft beyond D (depth D+1 reuses module D's weights with a cache of
   its own); those extra drafts are counted separately because no loss trained them.
2. Verify. ONE forward pass of the main model over [t_{N-1}, d_1, ..., d_m] (positions
   N-1..N-1+m) gives the main model's own next-token distribution p_j after each prefix.
3. Accept. Greedy: keep the longest prefix of drafts with d_j = argmax p_j, then add one
   *bonus* token, the main model's argmax right after the last accepted draft -- so every
   step yields between 1 and m+1 tokens and greedy output is token-for-token that of
   ``model.generate(..., temperature=0)``. Sampling (Leviathan et al. Algorithm 1, Chen et
   al. Algorithm 2): with d_j drawn from the draft distribution q_j, accept d_j with
   probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw the replacement
   from the residual norm(max(0, p_j - q_j)) and stop; if all m drafts pass, draw the bonus
   from p_{m+1}. Then every emitted token is distributed exactly as the main model's
   p -- for any draft model -- because

       P(emit x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(q(y), p(y))) * r(x) = p(x),
       with r = max(0, p - q) / sum max(0, p - q)

   (the first term is min(q(x), p(x)); the rejection mass equals sum max(0, p - q)).
4. Roll back. The main cache appended m+1 positions; ``KVCache.truncate`` drops those of
   rejected drafts. Module k's cache entry at position i is final only when t_{i+k} is an
   accepted token, i.e. i <= N-1-k+accepted: each module's cache is cut back to its final
   positions, and the next step recomputes the rest in the same forward call (no extra
   pass -- a module processes all its pending positions at once).

What the reader should notice
-----------------------------
* Correctness never depends on the drafts: bad drafts only cost speed. The tests check
  exact greedy equality, and the sampling distribution against the main model's exact
  two-token distribution computed by enumeration.
* The speed-up is (tokens per step) / (cost of a step relative to one plain step); the
  cost of a step is one main pass over m+1 tokens plus m draft blocks (each a single
  transformer block plus the output head). With the toy's 4 main layers, one MTP block is
  a quarter of the main model's layers, which caps what D and acceptance can buy.
  Measured on a CPU at batch 1 (``python -m minimoe.bench.speculative``): one module call
  costs about 0.3-0.37 of a one-token main pass, so two drafts cost ~0.6-0.7 of a plain
  step before any token is accepted.
* Drafting deeper is a gamble: a draft at depth j is only worth its module call and its
  share of the verify pass if drafts 1..j are all accepted. ``min_draft_confidence``
  stops a step's drafting after the first draft whose own probability (under its module)
  is below the threshold -- the dynamic draft length of EAGLE-2 (Li et al. 2024) in its
  simplest form. It keeps the output exact, greedy or sampled, because the decision
  depends only on the drafts, never on the main model. Whether it pays depends on how
  well the modules' confidence predicts acceptance (the benchmark prints both rows).
* Verifying is not free for an MoE: k+1 tokens are routed independently, so the verify
  pass touches up to (k+1) * top_k routed experts where a one-token step touches top_k
  (on the toy it costs ~1.2x a one-token pass). The larger the verified block, the more
  expert weights a memory-bound GPU has to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from minimoe.cache import KVCache
from minimoe.generate import check_request, filter_logits
from minimoe.mtp import first_input, next_input


@dataclass
class SpeculativeStats:
    """Counters of one speculative decoding run (batch 1).

    proposed[j]: drafts made at draft position j+1; reached[j]: how many of those were
    checked (all earlier drafts of the step accepted); accepted[j]: how many were accepted.
    accepted_lengths: drafts accepted per verification step (bonus token not counted).
    main_forwards: main-model passes, prefill included. stopped_early: steps whose drafting
    stopped before num_draft_tokens because a draft's confidence was too low. trace: per step the drafts, the
    number accepted and the token the main model emitted after them (for visualisation).
    """

    num_draft_modules: int
    proposed: list = field(default_factory=list)
    reached: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    accepted_lengths: list = field(default_factory=list)
    main_forwards: int = 0
    draft_forwards: int = 0
    stopped_early: int = 0
    new_tokens: int = 0
    trace: list = field(default_factory=list)

    def record(self, drafts: list, accepted: int, bonus: int) -> None:
        """One step: drafts proposed, how many were accepted, the main model's next token."""
        for j in range(len(drafts)):
            self.proposed[j] += 1
            self.reached[j] += int(j <= accepted)
            self.accepted[j] += int(j < accepted)
        if drafts:
            self.accepted_lengths.append(accepted)
        self.trace.append({"drafts": drafts, "accepted": accepted, "bonus": bonus})

    def _grow(self, size: int) -> None:
        for counts in (self.proposed, self.reached, self.accepted):
            counts.extend([0] * (size - len(counts)))

    @property
    def acceptance_rate(self) -> list:
        """Per draft position: accepted / proposed (position 1 = V3's 'second token')."""
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed)]

    @property
    def conditional_acceptance_rate(self) -> list:
        """Per draft position: accepted / reached (given all earlier drafts were accepted)."""
        return [a / r if r else float("nan") for a, r in zip(self.accepted, self.reached)]

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of drafts accepted per verification step."""
        steps = len(self.accepted_lengths)
        return sum(self.accepted_lengths) / steps if steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per main-model forward pass (1.0 for plain decoding)."""
        return self.new_tokens / self.main_forwards if self.main_forwards else 0.0

    def summary(self) -> dict:
        return {"num_draft_modules": self.num_draft_modules,
                "acceptance_rate": self.acceptance_rate,
                "conditional_acceptance_rate": self.conditional_acceptance_rate,
                "proposed": list(self.proposed), "accepted": list(self.accepted),
                "mean_accepted_length": self.mean_accepted_length,
                "tokens_per_forward": self.tokens_per_forward,
                "main_forwards": self.main_forwards, "draft_forwards": self.draft_forwards,
                "stopped_early": self.stopped_early, "new_tokens": self.new_tokens}


def probabilities(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                  top_p: Optional[float]) -> torch.Tensor:
    """(..., V) logits -> the sampling distribution of ``minimoe.generate.pick_next_token``."""
    shape = logits.shape
    flat = filter_logits(logits.float().reshape(-1, shape[-1]) / temperature, top_k, top_p)
    return torch.softmax(flat, dim=-1).reshape(shape)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) for the drafted token's main (p) and draft (q) probabilities."""
    # BEGIN SOLUTION speculative-acceptance
    return torch.clamp(p / q, max=1.0)
    # END SOLUTION


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): what to sample from after a rejection. p, q: (V,)."""
    # BEGIN SOLUTION speculative-acceptance
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return residual / total if total > 0 else p
    # END SOLUTION


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: list,
                   generator: Optional[torch.Generator]) -> tuple[int, int]:
    """Speculative sampling's accept/reject rule for one step.

    p: (m+1, V) main-model distributions after each prefix; q: (m, V) draft distributions;
    drafts: m token ids with drafts[j] ~ q[j]. Returns (number accepted, next token), the
    next token drawn from the residual at the first rejection or from p[m] if none.
    """
    # BEGIN SOLUTION speculative-acceptance
    for j, token in enumerate(drafts):
        u = torch.rand((), generator=generator)
        if u < acceptance_probability(p[j, token], q[j, token]):
            continue
        residual = residual_distribution(p[j], q[j])
        return j, int(torch.multinomial(residual, 1, generator=generator))
    m = len(drafts)
    return m, int(torch.multinomial(p[m], 1, generator=generator))
    # END SOLUTION


class DraftDepths:
    """The drafting side of one decoding run: depth j (1-based) drafts with module min(j, D),
    keeps a KV cache of its own, its output hidden states h^j in the form depth j+1 reads them
    (after the module's final norm when cfg.mtp_input is "post_norm") and the number of its
    positions that are final (committed[j]). hidden[0] holds the main model's states h^0."""

    def __init__(self, model, num_drafts: int, prompt_hidden: torch.Tensor,
                 drafts: Optional[tuple[list, list]] = None) -> None:
        D = len(model.mtp)
        self.model = model
        self.modules = [model.mtp[min(j, D) - 1] for j in range(1, num_drafts + 1)]
        self.caches = [KVCache(model.cfg.num_hidden_layers + D) for _ in self.modules]
        if drafts is not None:  # (runners, caches): the same modules' compiled static steps
            self.modules, self.caches = drafts
        self.committed = [0] * (num_drafts + 1)
        self.hidden = [first_input(model, prompt_hidden)] + [None] * num_drafts  # (1, pos, C)

    def draft_logits(self, j: int, sequence: list, N: int) -> torch.Tensor:
        """Run depth j over its pending positions i = committed[j]..N-2 (sequence: the N
        tokens and the drafts so far, so t_{i+j} is known); the (V,) logits of its draft."""
        start, module = self.committed[j], self.modules[j - 1]
        device = self.model.embed_tokens.weight.device
        previous = self.hidden[j - 1][:, start:N - 1]  # (1, P, C) h^{j-1}
        ids = torch.tensor([sequence[start + j:N - 1 + j]], device=device)  # (1, P) t_{i+j}
        positions = torch.arange(start, N - 1, device=device)  # (P,)
        h, _ = module(previous, self.model.embed_tokens(ids), positions, cache=self.caches[j - 1])
        h_next = next_input(self.model.cfg, module, h)  # (1, P, C) h^j as depth j+1 reads it
        kept = self.hidden[j]
        self.hidden[j] = h_next if kept is None else torch.cat([kept[:, :start], h_next], dim=1)
        return module.logits(h[:, -1], self.model.lm_head)[0]  # (V,)

    def roll_back(self, N: int, accepted: int, m: int, verified_hidden: torch.Tensor) -> None:
        """After a step that drafted m tokens and accepted `accepted`: depth j keeps positions
        i <= N-1-j+accepted (t_{i+j} accepted); h^0 gains the verified inputs' states."""
        for j in range(1, m + 1):
            self.committed[j] = max(0, min(N - 1, N - j + accepted))
            self.caches[j - 1].truncate(self.committed[j])
            self.hidden[j] = self.hidden[j][:, :self.committed[j]]
        verified = first_input(self.model, verified_hidden[:, :accepted + 1])  # (1, acc+1, C)
        self.hidden[0] = torch.cat([self.hidden[0][:, :N - 1], verified], dim=1)


def check_speculative_request(model, input_ids: torch.Tensor, max_new_tokens: int,
                              num_drafts: int, temperature: float,
                              min_draft_confidence: float) -> None:
    """Raise ValueError naming the argument for a request speculative decoding cannot serve."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"speculative decoding takes one non-empty sequence (1, T), got "
                         f"{tuple(input_ids.shape)}")
    if len(model.mtp) == 0:
        raise ValueError("speculative decoding needs MTP modules (num_nextn_predict_layers > 0)")
    if num_drafts < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_drafts}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 <= min_draft_confidence <= 1.0:
        raise ValueError(f"min_draft_confidence must be in [0, 1], got {min_draft_confidence}")
    check_request(model, input_ids, max_new_tokens)


@dataclass
class Sampler:
    """How tokens are chosen: greedy (temperature 0) or sampled as ``model.generate`` does."""

    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    generator: Optional[torch.Generator]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: torch.Tensor) -> tuple[int, Optional[torch.Tensor]]:
        """logits (V,) -> (token, its distribution or None when greedy)."""
        if self.greedy:
            return int(logits.argmax()), None
        probs = probabilities(logits, self.temperature, self.top_k, self.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator)), probs

    def accept(self, main_logits: torch.Tensor, drafts: list, draft_probs: list) -> tuple[int, int]:
        """main_logits (m+1, V) after each prefix -> (drafts accepted, the next token)."""
        m = len(drafts)
        if self.greedy:
            targets = main_logits.argmax(dim=-1).tolist()  # (m+1,)
            # BEGIN SOLUTION speculative-acceptance
            accepted = 0
            while accepted < m and drafts[accepted] == targets[accepted]:
                accepted += 1
            # END SOLUTION
            return accepted, targets[accepted]
        p = probabilities(main_logits, self.temperature, self.top_k, self.top_p)  # (m+1, V)
        q = torch.stack(draft_probs) if m else p[:0]
        return verify_sampled(p, q, drafts, self.generator)


def draft_confidence(logits: torch.Tensor, token: int, probs: Optional[torch.Tensor]) -> float:
    """The draft module's own probability of the token it drafted (greedy: the softmax's)."""
    if probs is None:
        probs = torch.softmax(logits.float(), dim=-1)
    return float(probs[token])


def _runners(model, num_drafts: int, max_length: int, compile: bool):
    """(main model runner, its cache, None or (draft runners, their caches))."""
    if not compile:
        return model, KVCache(len(model.layers)), None
    from minimoe.static_cache import speculative_parts

    D = len(model.mtp)
    modules = [model.mtp[min(j, D) - 1] for j in range(1, num_drafts + 1)]
    main, main_cache, runners, caches = speculative_parts(model, modules, max_length)
    return main, main_cache, (runners, caches)


@torch.no_grad()
def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                         num_draft_tokens: Optional[int] = None, temperature: float = 0.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None,
                         generator: Optional[torch.Generator] = None,
                         eos_token_id: Optional[int] = None, min_draft_confidence: float = 0.0,
                         compile: bool = False):
    """Decode with the model's MTP modules as drafters; returns (ids (1, T + new), stats).

    num_draft_tokens: drafts per step (default D = number of MTP modules); more than D
    re-applies the last module. temperature 0 is greedy (identical to ``model.generate``);
    otherwise the output is distributed as the main model's sampling distribution (with the
    same temperature, top-k and top-p). min_draft_confidence: stop drafting a step early
    once a draft's own probability (under its module's distribution) falls below this
    value (0 = always draft num_draft_tokens). compile=True runs the main model (its verify
    pass of 1 + drafts tokens) and the modules over pre-allocated caches with compiled steps
    (``minimoe.static_cache``); greedy with one draft, each step is one compiled call
    (``greedy_one_draft``). See the module docstring for the algorithm.
    """
    num_drafts = len(model.mtp) if num_draft_tokens is None else num_draft_tokens
    check_speculative_request(model, input_ids, max_new_tokens, num_drafts, temperature,
                              min_draft_confidence)
    sampler = Sampler(temperature, top_k, top_p, generator)
    was_training = model.training
    model.eval()
    if compile and sampler.greedy and num_drafts == 1 and max_new_tokens > 0:
        tokens, stats = greedy_one_draft(model, input_ids, max_new_tokens, eos_token_id)
        model.train(was_training)
        return torch.tensor([tokens], device=input_ids.device), stats
    stats = SpeculativeStats(num_draft_modules=len(model.mtp))
    stats._grow(num_drafts)
    # what runs the main model and the drafts: the modules themselves over growing caches, or
    # (compile=True) their compiled steps over pre-allocated ones
    main, main_cache, drafts = _runners(model, num_drafts,
                                        input_ids.shape[1] + max_new_tokens + num_drafts, compile)
    # prefill: the prompt through the main model gives h^0 and the first token
    out = main(input_ids, cache=main_cache)
    stats.main_forwards += 1
    depths = DraftDepths(model, num_drafts, out.hidden, drafts)
    first, _ = sampler.pick(out.logits[0, -1])
    tokens = input_ids[0].tolist() + ([first] if max_new_tokens > 0 else [])
    new_tokens = 1 if max_new_tokens > 0 else 0
    finished = eos_token_id is not None and new_tokens == 1 and first == eos_token_id
    device = input_ids.device

    while new_tokens < max_new_tokens and not finished:
        N = len(tokens)
        # up to m + 1 tokens come out of a step; the last may be cut at max_new_tokens
        m = min(num_drafts, max_new_tokens - new_tokens)
        # 1. draft d_1..d_m, depth by depth
        drafts, draft_probs = make_drafts(depths, sampler, tokens, m, min_draft_confidence, stats)
        m = len(drafts)
        # 2. verify: one main pass over [t_{N-1}, d_1..d_m]
        verify_ids = torch.tensor([tokens[-1:] + drafts], device=device)  # (1, m+1)
        out = main(verify_ids, cache=main_cache)
        stats.main_forwards += 1
        # 3. accept the longest agreeing prefix plus one token from the main model
        accepted, bonus = sampler.accept(out.logits[0], drafts, draft_probs)
        stats.record(drafts, accepted, bonus)
        # 4. roll back the main cache to the accepted inputs t_{N-1}, d_1..d_accepted, and
        # each depth to its final positions
        main_cache.truncate(N + accepted)
        depths.roll_back(N, accepted, m, out.hidden)
        emitted, finished = emitted_tokens(drafts, accepted, bonus,
                                           max_new_tokens - new_tokens, eos_token_id)
        tokens += emitted
        new_tokens += len(emitted)

    stats.new_tokens = new_tokens
    model.train(was_training)
    return torch.tensor([tokens], device=device), stats


def make_drafts(depths: DraftDepths, sampler: Sampler, tokens: list, m: int,
                min_draft_confidence: float, stats: SpeculativeStats) -> tuple[list, list]:
    """Step 1 of the loop: up to m drafts after `tokens`, depth by depth; (drafts, their
    distributions or None when greedy)."""
    N = len(tokens)
    drafts, draft_probs = [], []
    for j in range(1, m + 1):
        draft_logits = depths.draft_logits(j, tokens + drafts, N)  # (V,)
        stats.draft_forwards += 1
        token, probs = sampler.pick(draft_logits)
        drafts.append(token)
        draft_probs.append(probs)
        if (j < m and min_draft_confidence > 0
                and draft_confidence(draft_logits, token, probs) < min_draft_confidence):
            # an unlikely draft: its successors would probably be rejected too, so stop
            # here and save their module calls and their share of the verify pass
            stats.stopped_early += 1
            break
    return drafts, draft_probs


def emitted_tokens(drafts: list, accepted: int, bonus: int, room: int,
                   eos_token_id: Optional[int]) -> tuple[list, bool]:
    """What a step emits: the accepted drafts and the bonus token, cut at `room` tokens and
    after an end-of-sequence token; and whether that token ended the sequence."""
    emitted = (drafts[:accepted] + [bonus])[:room]
    if eos_token_id is not None and eos_token_id in emitted:
        return emitted[:emitted.index(eos_token_id) + 1], True
    return emitted, False


def greedy_one_draft(model, input_ids: torch.Tensor, max_new_tokens: int,
                     eos_token_id: Optional[int] = None,
                     compile: bool = True) -> tuple[list, SpeculativeStats]:
    """The loop above for greedy decoding with one draft per step, each step (verify, accept,
    draft the next) one compiled call (``minimoe.static_cache.GreedyOneDraft``); returns
    (the token list, its statistics). ``speculative_generate(..., compile=True)`` takes it
    when it can."""
    from minimoe.static_cache import GreedyOneDraft

    stats = SpeculativeStats(num_draft_modules=len(model.mtp))
    stats._grow(1)

    # a step verifies positions N-1 and N of N < T + max_new_tokens tokens: the caches need
    # T + max_new_tokens slots, no more (every slot is attended to, masked or not)
    length = input_ids.shape[1] + max_new_tokens
    with GreedyOneDraft(model, length, compile) as runner:
        first, draft = runner.prefill(input_ids)
        stats.main_forwards += 1
        stats.draft_forwards += 1
        tokens, new_tokens = input_ids[0].tolist() + [first], 1
        finished = eos_token_id is not None and first == eos_token_id
        while new_tokens < max_new_tokens and not finished:
            accepted, bonus, next_draft = runner(tokens[-1], draft)
            stats.main_forwards += 1
            stats.draft_forwards += 1  # the next step's draft, made in the same call
            stats.record([draft], accepted, bonus)
            emitted, finished = emitted_tokens([draft], accepted, bonus,
                                               max_new_tokens - new_tokens, eos_token_id)
            tokens += emitted
            new_tokens += len(emitted)
            draft = next_draft
    stats.new_tokens = new_tokens
    return tokens, stats
