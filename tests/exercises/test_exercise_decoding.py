"""Exercises mtp-loss and speculative-acceptance: the MTP loss (embedding-first concatenation) and speculative acceptance.

References: the MTP chain written out here (DeepSeek-V3 Eq. 21-24, embedding first as in the
released checkpoints); hand-worked acceptance cases; the distribution speculative sampling must
reproduce (Leviathan et al. 2023, Theorem 1: the emitted token is distributed as p); plain
greedy decoding (``model.generate``), which greedy speculation must equal token for token.
The models are dense (no router) so these exercises need no other exercise solved.
"""

import pytest
import torch
import torch.nn.functional as F

from minimoe.config import ModelConfig
from minimoe.model import Transformer
from minimoe.mtp import MTPModule
from minimoe.speculative import (acceptance_probability, residual_distribution,
                                 speculative_generate, verify_sampled)


def dense_mtp_model(depth=2, seed=0):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, attention="mha", n_routed_experts=0,
                      intermediate_size=64, first_k_dense_replace=0, max_position_embeddings=96,
                      num_nextn_predict_layers=depth)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def mtp_chain_by_hand(model, inputs, targets, hidden, embedding_first=True):
    """[CE of depth k], k = 1..D: h^k = Block(W_eh [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)])."""
    T = inputs.shape[1]
    h, losses = hidden, []
    for k, module in enumerate(model.mtp, start=1):
        emb = module.enorm(model.embed_tokens(inputs[:, k:]))
        previous = module.hnorm(h[:, :T - k])
        parts = [emb, previous] if embedding_first else [previous, emb]
        h, _ = module.block(module.eh_proj(torch.cat(parts, dim=-1)), torch.arange(T - k), None)
        logits = model.lm_head(module.final_norm(h))
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, k:].reshape(-1)))
    return losses


@pytest.mark.exercise("mtp-loss", points=3)
def test_mtp_losses_follow_the_chain_embedding_first():
    model = dense_mtp_model()
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        out = model(inputs, targets=targets)
        want = mtp_chain_by_hand(model, inputs, targets, out.hidden)
        swapped = mtp_chain_by_hand(model, inputs, targets, out.hidden, embedding_first=False)
    for k in (1, 2):
        got = out.aux["losses"][f"mtp_ce_{k}"]
        torch.testing.assert_close(got, want[k - 1], atol=1e-5, rtol=1e-5)
        # the order of the concatenation matters: a hidden-first model gives another loss
        assert abs(got.item() - swapped[k - 1].item()) > 1e-3


@pytest.mark.exercise("mtp-loss", points=3)
def test_mtp_loss_ignores_padding_labels():
    model = dense_mtp_model(seed=2)
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, -3:] = -100  # padding: cross_entropy's ignore_index
    with torch.no_grad():
        out = model(inputs, targets=targets)
        want = mtp_chain_by_hand(model, inputs, targets, out.hidden)
    for k in (1, 2):
        torch.testing.assert_close(out.aux["losses"][f"mtp_ce_{k}"], want[k - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.exercise("speculative-acceptance", points=3)
def test_acceptance_and_residual_hand_cases():
    assert acceptance_probability(torch.tensor(0.2), torch.tensor(0.5)).item() == pytest.approx(0.4)
    assert acceptance_probability(torch.tensor(0.6), torch.tensor(0.3)).item() == pytest.approx(1.0)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    p, q = torch.tensor([0.4, 0.4, 0.2]), torch.tensor([0.1, 0.2, 0.7])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.6, 0.4, 0.0]))
    # a draft the main model gives probability 0 is always rejected; one it agrees on, kept
    generator = torch.Generator().manual_seed(0)
    p2 = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q1 = torch.tensor([[1.0, 0.0, 0.0]])
    assert verify_sampled(p2, q1, [0], generator) == (0, 1)
    q1 = torch.tensor([[0.0, 1.0, 0.0]])
    accepted, _ = verify_sampled(p2, q1, [1], generator)
    assert accepted == 1


@pytest.mark.exercise("speculative-acceptance", points=3)
def test_rejection_sampling_emits_tokens_distributed_as_the_main_model():
    """Two drafts from q; the first emitted token must follow p[0], whatever q is."""
    generator = torch.Generator().manual_seed(4)
    p = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.4, 0.1, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.55, 0.05, 0.3, 0.1], [0.1, 0.6, 0.2, 0.1]])
    trials, counts, accepted_first = 6000, torch.zeros(4), 0
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[j], 1, generator=generator)) for j in range(2)]
        accepted, bonus = verify_sampled(p, q, drafts, generator)
        counts[drafts[0] if accepted >= 1 else bonus] += 1
        accepted_first += accepted >= 1
    # 5 standard errors of a frequency near 0.5 with 6000 trials: 0.032. Sampling the
    # rejection from p instead of the residual moves token 0 to 0.16 (+0.06); accepting
    # every draft gives q[0] (token 0 at 0.55)
    torch.testing.assert_close(counts / trials, p[0], atol=0.032, rtol=0)
    # P(accept the first draft) = sum_x min(p, q) = 0.1 + 0.05 + 0.15 + 0.1
    assert accepted_first / trials == pytest.approx(0.4, abs=0.032)


def reference_mtp_forward(self, previous_hidden, next_token_embeddings, positions, cache=None):
    """MTPModule.forward as the reference writes it: the drafter, independent of exercise 10."""
    combined = torch.cat([self.enorm(next_token_embeddings), self.hnorm(previous_hidden)], dim=-1)
    h, moe_aux = self.block(self.eh_proj(combined), positions, cache)
    if cache is not None:
        cache.advance(h.shape[1])
    return h, moe_aux


@pytest.mark.exercise("speculative-acceptance", points=3)
@pytest.mark.parametrize("drafts", [1, 2, 3])
def test_greedy_speculation_equals_greedy_decoding(monkeypatch, drafts):
    monkeypatch.setattr(MTPModule, "forward", reference_mtp_forward)
    model = dense_mtp_model(seed=5)
    prompt = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = model.generate(prompt, 16, temperature=0)
        ids, stats = speculative_generate(model, prompt, 16, num_draft_tokens=drafts)
    assert torch.equal(ids, reference)
    # each step accepts exactly the drafts that agree with greedy decoding, then its token
    emitted = reference[0, 6:].tolist()
    position = 1  # the first new token comes from the prefill pass, before any drafting
    for step in stats.trace:
        accepted = step["accepted"]
        assert step["drafts"][:accepted] == emitted[position:position + accepted]
        if accepted < len(step["drafts"]) and position + accepted < len(emitted):
            assert step["drafts"][accepted] != emitted[position + accepted]
            assert step["bonus"] == emitted[position + accepted]
        position += accepted + 1
