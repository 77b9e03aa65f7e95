"""The static cache and the compiled decode step: greedy output identical to eager decoding,
plain and speculative; the benchmark runs (not timed)."""

import pytest
import torch

import minimoe
from minimoe.speculative import greedy_one_draft, speculative_generate
from minimoe.static_cache import DecodeModes, StaticDecoder, StaticKVCache

ATTENTION = {"mla": {}, "gqa": dict(attention="gqa", num_key_value_heads=2),
             "mha": dict(attention="mha", num_key_value_heads=4)}


def tiny_model(attention: str = "mla", **overrides) -> minimoe.Transformer:
    torch.manual_seed(0)
    settings = dict(num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1,
                    initializer_range=0.2, **ATTENTION[attention])
    cfg = minimoe.ModelConfig.preset("toy", **{**settings, **overrides})
    return minimoe.Transformer(cfg).eval()


@pytest.mark.parametrize("attention", ["mla", "gqa", "mha"])
def test_static_cache_logits_equal_growing_cache(attention):
    """Eager steps over the pre-allocated, masked cache give the logits of the KVCache path."""
    model = tiny_model(attention)
    ids = torch.randint(0, 256, (2, 9))
    decoder = StaticDecoder(model, batch_size=2, max_length=12, compile=False)
    cache = minimoe.cache.KVCache(len(model.layers))
    with torch.no_grad():
        for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:9]):
            static = decoder(chunk).logits
            growing = model(chunk, cache=cache).logits
            torch.testing.assert_close(static, growing, rtol=1e-5, atol=1e-5)
        decoder.cache.truncate(6)  # roll back two tokens, as speculative decoding does
        cache.truncate(6)
        torch.testing.assert_close(decoder(ids[:, 6:8]).logits,
                                   model(ids[:, 6:8], cache=cache).logits, rtol=1e-5, atol=1e-5)


def test_compiled_generate_equals_eager_greedy():
    model = tiny_model("mla")
    prompt = torch.randint(0, 256, (2, 7))
    eager = model.generate(prompt, 10)
    compiled = model.generate(prompt, 10, compile=True)
    assert torch.equal(compiled, eager)
    assert torch.equal(model.generate(prompt[:, :5], 12, compile=True),
                       model.generate(prompt[:, :5], 12))


def test_compiled_speculative_equals_greedy():
    """One draft (the fused step of static_cache.GreedyOneDraft) and two (the general loop
    over compiled module steps) both give model.generate's greedy tokens (an untrained model:
    its drafts are rejected; test_speculative compiles the one-call step on a trained one)."""
    model = tiny_model("mla")
    prompt = torch.randint(0, 256, (1, 6))
    greedy = model.generate(prompt, 10)
    for drafts in (1, 2):
        ids, stats = speculative_generate(model, prompt, 10, num_draft_tokens=drafts,
                                          compile=True)
        assert torch.equal(ids, greedy), f"{drafts} draft(s)"
        assert stats.new_tokens == 10


def fused_and_general(model, prompt, new_tokens, eos=None):
    """(tokens, stats) of the one-call-per-step loop (run eagerly) and of the general loop."""
    tokens, stats = greedy_one_draft(model, prompt, new_tokens, eos, compile=False)
    ids, general = speculative_generate(model, prompt, new_tokens, num_draft_tokens=1,
                                        eos_token_id=eos)
    return (tokens, stats), (ids[0].tolist(), general)


@pytest.mark.parametrize("new_tokens", [1, 2, 9])
def test_one_call_step_is_the_general_loop(new_tokens):
    """Same tokens, same drafts, same acceptances, step by step (the trace), and the same
    count of main passes; the one-call step drafts once more (its last draft is unused).
    Short runs and an untrained model (drafts rejected): test_speculative has the trained
    model whose drafts are also accepted."""
    model = tiny_model("mla")
    for seed in range(3):
        prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(seed))
        (tokens, fused), (expected, general) = fused_and_general(model, prompt, new_tokens)
        assert tokens == expected == model.generate(prompt, new_tokens)[0].tolist()
        assert fused.trace == general.trace
        assert fused.main_forwards == general.main_forwards
        assert fused.draft_forwards == general.draft_forwards + 1
        assert fused.new_tokens == general.new_tokens == new_tokens


def test_one_call_step_stops_at_end_of_sequence():
    model = tiny_model("mla")
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    free = model.generate(prompt, 8)[0].tolist()
    eos = free[5 + 3]  # the 4th new token ends the sequence
    (tokens, _), (expected, _) = fused_and_general(model, prompt, 8, eos=eos)
    assert tokens == expected
    assert tokens[-1] == eos and len(tokens) <= 5 + 4


def test_decode_modes_gather_only_small_steps_and_restore():
    """MoE layers gather while a step has <= E slots (here E = 4, k = 2); MLA runs absorbed;
    both are put back afterwards (the decoder above compares both regimes with the cache)."""
    model = tiny_model("mla")
    modes = DecodeModes(model)
    assert len(modes.moe) == 2 and len(modes.mla) == 3  # layer 1 and the MTP module's layer
    for tokens, expected in ((1, "gather"), (2, "gather"), (3, "sorted")):
        with modes(tokens):
            assert [m.dispatch for m in modes.moe] == [expected] * 2
            assert all(m.mla_mode == "absorbed" for m in modes.mla)
        assert [m.dispatch for m in modes.moe] == ["sorted"] * 2
        assert all(m.mla_mode == "latent" for m in modes.mla)
    with modes(1), modes(3):  # nested: a long step inside a decoding run sorts its slots
        assert [m.dispatch for m in modes.moe] == ["sorted"] * 2


def test_static_cache_errors():
    cache = StaticKVCache(batch_size=1, max_length=4)
    cache.start_write(3, "cpu")
    cache.length = 3
    with pytest.raises(ValueError, match="do not fit"):
        cache.start_write(2, "cpu")
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="use_cache"):
        tiny_model().generate(torch.zeros(1, 2, dtype=torch.long), 2, use_cache=False,
                              compile=True)


def test_benchmark_quick_mode_runs(capsys):
    """The benchmark's code path end to end, with compilation switched off to stay quick
    (torch.compile's functions run eagerly; speed is not under test here). The public
    stance, not a patched dynamo config: restoring that attribute with monkeypatch removed
    it, and every later torch.compile in the same process failed."""
    from minimoe.bench import vs_transformers

    with torch.compiler.set_stance("force_eager"):
        assert vs_transformers.main(["--quick", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    for task in ("training step 2x16", "prefill 1x32", "greedy decode, batch 8",
                 "MTP speculative"):
        assert task in table
    assert "| transformers grouped_mm, static, compile forced cache |" in table
