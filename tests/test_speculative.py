"""Speculative decoding with MTP drafters: exact greedy output, exact sampling distribution."""

import pytest
import torch

import minimoe
from minimoe import speculative
from minimoe.model import Transformer
from minimoe.speculative import (acceptance_probability, greedy_one_draft,
                                 residual_distribution, speculative_generate)
from minimoe.train import TrainArgs, train

MLA_DIMS = dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8)


def tiny(preset, depth, **changes):
    base = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=16, num_hidden_layers=2, n_routed_experts=8, n_group=2,
                topk_group=1, max_position_embeddings=96, num_nextn_predict_layers=depth)
    if preset == "toy":
        base.update(MLA_DIMS)
    base.update(changes)
    return minimoe.ModelConfig.preset(preset, **base)


@pytest.fixture(scope="module")
def trained():
    """A tiny MLA model with D = 2 trained briefly: its drafts are partly right."""
    cfg = tiny("toy", 2)
    overrides = {k: getattr(cfg, k) for k in (
        "hidden_size", "num_attention_heads", "intermediate_size", "moe_intermediate_size",
        "num_hidden_layers", "n_routed_experts", "n_group", "topk_group",
        "max_position_embeddings", "num_nextn_predict_layers", *MLA_DIMS)}
    args = TrainArgs(preset="toy", config_overrides=overrides, corpus_tokens=30_000, steps=120,
                     lr=1e-2, min_lr=1e-3, batch_size=8, seq_len=48, warmup_steps=5, eval_every=0, progress=False,
                     save=False)
    model, _, (_, val) = train(args)
    return model.eval(), val


@pytest.mark.parametrize("preset", ["toy", "toy-gqa"])
@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_equals_generate_random_model(preset, depth):
    torch.manual_seed(depth)
    model = Transformer(tiny(preset, depth)).eval()
    g = torch.Generator().manual_seed(0)
    for prompt_len, new in [(1, 9), (6, 14)]:
        prompt = torch.randint(0, 256, (1, prompt_len), generator=g)
        reference = model.generate(prompt, new, temperature=0)
        for drafts in (0, depth, depth + 1):
            ids, stats = speculative_generate(model, prompt, new, num_draft_tokens=drafts)
            assert torch.equal(ids, reference), (prompt_len, new, drafts)
            assert stats.new_tokens == new


def test_greedy_equals_generate_trained_model_with_rollback(trained):
    model, val = trained
    total_accepted = total_rejected = 0
    for start, new in [(0, 40), (300, 23), (700, 31), (1100, 17), (1300, 29)]:
        prompt = val.tokens[start:start + 12].long()[None]
        reference = model.generate(prompt, new)
        for drafts in (2, 3):
            ids, stats = speculative_generate(model, prompt, new, num_draft_tokens=drafts)
            assert torch.equal(ids, reference), (start, drafts)
            total_accepted += sum(stats.accepted)
            total_rejected += sum(stats.reached) - sum(stats.accepted)
            # bookkeeping: every step emits its accepted drafts plus one main-model token
            assert len(stats.accepted_lengths) == stats.main_forwards - 1
            assert stats.new_tokens == new
    # both branches (accept and roll back) were exercised
    assert total_accepted > 10 and total_rejected > 5


def test_one_call_step_is_the_general_loop_on_a_trained_model(trained):
    """static_cache.GreedyOneDraft (one call per step: verify, accept, draft the next) makes
    the general loop's steps: the same drafts, acceptances and tokens, step by step -- run
    eagerly here, compiled once at the end (the compiled code must not change a token)."""
    model, val = trained
    total_accepted = total_rejected = 0
    for start, new in [(0, 40), (300, 23), (700, 31)]:
        prompt = val.tokens[start:start + 12].long()[None]
        tokens, stats = greedy_one_draft(model, prompt, new, compile=False)
        ids, general = speculative_generate(model, prompt, new, num_draft_tokens=1)
        assert tokens == ids[0].tolist() == model.generate(prompt, new)[0].tolist()
        assert stats.trace == general.trace
        assert stats.main_forwards == general.main_forwards
        total_accepted += sum(stats.accepted)
        total_rejected += sum(stats.reached) - sum(stats.accepted)
    assert total_accepted > 10 and total_rejected > 5  # both branches exercised
    ids, compiled = speculative_generate(model, prompt, new, num_draft_tokens=1, compile=True)
    assert ids[0].tolist() == tokens and compiled.trace == stats.trace


def test_confidence_gate_keeps_greedy_output_and_drafts_less(trained):
    model, val = trained
    stopped = 0
    for start, new in [(0, 40), (700, 31), (1300, 29)]:
        prompt = val.tokens[start:start + 12].long()[None]
        reference = model.generate(prompt, new)
        _, full = speculative_generate(model, prompt, new, num_draft_tokens=3)
        ids, gated = speculative_generate(model, prompt, new, num_draft_tokens=3,
                                          min_draft_confidence=0.6)
        assert torch.equal(ids, reference), start
        assert gated.new_tokens == new
        # a stopped step makes fewer module calls than the full draft length
        assert gated.draft_forwards <= full.draft_forwards
        assert sum(gated.proposed) == sum(len(s["drafts"]) for s in gated.trace)
        stopped += gated.stopped_early
    assert stopped > 0  # the gate was exercised
    # confidence 1.0 stops every step after its first draft
    prompt = val.tokens[:12].long()[None]
    ids, one = speculative_generate(model, prompt, 20, num_draft_tokens=3,
                                    min_draft_confidence=1.0)
    assert torch.equal(ids, model.generate(prompt, 20))
    assert one.proposed[1] == 0 and one.proposed[0] > 0
    with pytest.raises(ValueError, match="min_draft_confidence"):
        speculative_generate(model, prompt, 4, min_draft_confidence=1.5)


def test_statistics_of_a_run(trained):
    model, val = trained
    prompt = val.tokens[100:116].long()[None]
    _, stats = speculative_generate(model, prompt, 30)
    rates = stats.acceptance_rate
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)
    assert stats.accepted[1] <= stats.accepted[0]  # a second draft needs the first
    emitted = sum(s["accepted"] + 1 for s in stats.trace) + 1  # + the prefill's token
    assert emitted >= stats.new_tokens == 30
    assert stats.tokens_per_forward == pytest.approx(30 / stats.main_forwards)
    assert stats.mean_accepted_length == pytest.approx(
        sum(stats.accepted_lengths) / len(stats.accepted_lengths))
    assert set(stats.summary()) >= {"acceptance_rate", "mean_accepted_length",
                                    "tokens_per_forward"}


def test_errors():
    model = Transformer(tiny("toy-gqa", 0))
    with pytest.raises(ValueError, match="MTP modules"):
        speculative_generate(model, torch.zeros(1, 3, dtype=torch.long), 4)
    model = Transformer(tiny("toy-gqa", 1))
    with pytest.raises(ValueError, match="one non-empty sequence"):
        speculative_generate(model, torch.zeros(2, 3, dtype=torch.long), 4)


def test_rejection_rule_pieces():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(acceptance_probability(p, q), torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    # P(emit x) = min(p, q)(x) + (rejection mass) * residual(x) = p(x)
    emitted = torch.minimum(p, q) + (1 - torch.minimum(p, q).sum()) * residual_distribution(p, q)
    torch.testing.assert_close(emitted, p)


# ---- the sampling distribution, end to end -----------------------------------------------
V, NEW = 3, 3  # 27 possible continuations


@pytest.fixture(scope="module")
def small_vocab():
    """A 3-token vocabulary model with D = 2 and peaked, random distributions, and the exact
    distribution of its next 3 tokens computed by enumeration."""
    cfg = minimoe.ModelConfig.preset(
        "toy-gqa", vocab_size=V, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0,
        num_hidden_layers=1, num_nextn_predict_layers=2, max_position_embeddings=16,
        initializer_range=0.5)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = [0, 1, 2]
    exact = {}

    def expand(sequence, probability):
        if len(sequence) == len(prompt) + NEW:
            exact[tuple(sequence[len(prompt):])] = probability
            return
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([sequence])).logits[0, -1].float(), dim=-1)
        for token in range(V):
            expand(sequence + [token], probability * float(p[token]))

    expand(prompt, 1.0)
    return model, torch.tensor([prompt]), exact


def chi_square(model, prompt, exact, samples, seed=0, **options):
    """Pearson's statistic of sampled continuations against the exact distribution, with the
    outcomes of expected count < 5 pooled into one bin; returns (statistic, degrees)."""
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(samples):
        ids, _ = speculative_generate(model, prompt, NEW, temperature=1.0, generator=generator,
                                      **options)
        key = tuple(ids[0, prompt.shape[1]:].tolist())
        counts[key] = counts.get(key, 0) + 1
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for key, probability in exact.items():
        if probability * samples >= 5:
            observed.append(counts.get(key, 0))
            expected.append(probability * samples)
        else:
            pooled_o += counts.get(key, 0)
            pooled_e += probability * samples
    observed.append(pooled_o)
    expected.append(pooled_e)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return statistic, len(observed) - 1


SAMPLES = 1000


def critical(degrees: int) -> float:
    """The chi-square quantile at 1 - 0.001 (Wilson-Hilferty; within 1% for degrees >= 5)."""
    z = 3.0902  # standard normal quantile at 0.999
    return degrees * (1 - 2 / (9 * degrees) + z * (2 / (9 * degrees)) ** 0.5) ** 3


def test_speculative_sampling_matches_main_model_distribution(small_vocab):
    model, prompt, exact = small_vocab
    statistic, degrees = chi_square(model, prompt, exact, SAMPLES)
    assert statistic < critical(degrees), (statistic, degrees)


def test_confidence_gated_sampling_matches_main_model_distribution(small_vocab):
    # the draft length now depends on the drafts (never on the main model): still exact
    model, prompt, exact = small_vocab
    statistic, degrees = chi_square(model, prompt, exact, SAMPLES, seed=1,
                                    min_draft_confidence=0.5)
    assert statistic < critical(degrees), (statistic, degrees)


def test_wrong_rules_fail_the_same_test(small_vocab, monkeypatch):
    model, prompt, exact = small_vocab
    # a common mistake: after a rejection, resample from p instead of norm(max(0, p - q))
    with monkeypatch.context() as patch:
        patch.setattr(speculative, "residual_distribution", lambda p, q: p)
        statistic, degrees = chi_square(model, prompt, exact, SAMPLES)
        assert statistic > critical(degrees), (statistic, degrees)
    # trusting the drafts: accept every drafted token
    with monkeypatch.context() as patch:
        patch.setattr(speculative, "acceptance_probability", lambda p, q: torch.ones(()))
        statistic, degrees = chi_square(model, prompt, exact, 300)
        assert statistic > critical(degrees), (statistic, degrees)


@pytest.mark.parametrize("mtp_input", ["post_norm", "pre_norm"])
def test_drafts_are_the_argmax_of_the_mtp_logits_the_loss_trains(mtp_input):
    """Decoding feeds the modules the same state as training (cfg.mtp_input): every step's
    drafts d_1, d_2 are the argmax of minimoe.mtp.mtp_logits over the same prefix (cached
    drafting, rolled back after rejections, against one plain pass over the sequence)."""
    torch.manual_seed(4)
    model = Transformer(tiny("toy", 2, mtp_input=mtp_input)).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # unit-scale weights and norm gains away from one
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if "norm" in name else noise / param.shape[-1] ** 0.5)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 7), generator=generator)
    ids, stats = speculative_generate(model, prompt, max_new_tokens=40, num_draft_tokens=2)
    tokens = ids[0].tolist()
    N = 8  # the prompt and the first token
    checked = 0
    for step in stats.trace:
        drafts = step["drafts"]  # two, or fewer in the last step
        depths = minimoe.mtp.mtp_logits(model, torch.tensor([tokens[:N] + drafts[:1]]))
        for draft, logits in zip(drafts, depths):
            assert draft == int(logits[0, N - 2].argmax())  # depth k row i: t_{i+k+1}
            checked += 1
        N += step["accepted"] + 1
    assert checked >= 20 and N == len(tokens)
