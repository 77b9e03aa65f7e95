"""Expert offloading: an offloaded load computes the same logits as a normal load, and its
LRU hit/miss/eviction counts and bytes read equal an independent LRU replay of the experts
the router chose, layer by layer."""

import pytest
import torch

import minimoe
from hf_weights import randomise
from minimoe.experts import RoutedExperts
from minimoe.checkpoints.export import save_pretrained
from minimoe.moe import MoE
from minimoe.checkpoints.offload import OffloadedExperts, offload_stats

E = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    cfg = minimoe.ModelConfig.preset(
        "toy", vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=E, num_experts_per_tok=2,
        moe_intermediate_size=16, n_group=1, topk_group=1, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = randomise(minimoe.Transformer(cfg).eval(), 1)
    save_pretrained(model, folder, max_shard_size="20KB")
    return folder


def _routing_trace(model, ids_list):
    """The (layer, expert) requests dispatch_naive makes: per forward, per MoE layer in order,
    the experts that received at least one token, ascending. From hooks on the routers."""
    chosen = []
    hooks = [module.gate.register_forward_hook(
        lambda mod, args, out, name=name: chosen.append(
            [(name + ".experts", e) for e in sorted(set(out.topk_idx.flatten().tolist()))]))
        for name, module in model.named_modules() if isinstance(module, MoE)]
    with torch.no_grad():
        for ids in ids_list:
            model(ids)
    for hook in hooks:
        hook.remove()
    return [request for layer in chosen for request in layer]


def _lru_replay(requests, capacity):
    """A plain-list LRU: front = least recently used."""
    cache, hits, misses, evictions = [], 0, 0, 0
    for key in requests:
        if key in cache:
            hits += 1
            cache.remove(key)
        else:
            misses += 1
            if len(cache) == capacity:
                cache.pop(0)
                evictions += 1
        cache.append(key)
    return hits, misses, evictions


def test_offloaded_logits_equal_a_normal_load(checkpoint):
    normal = minimoe.load_pretrained(checkpoint)
    offloaded = minimoe.load_pretrained(checkpoint, offload_experts=True, expert_cache_size=3)
    assert offloaded.cfg.dispatch == "naive"
    assert not any(isinstance(m, RoutedExperts) for m in offloaded.modules())
    assert sum(isinstance(m, OffloadedExperts) for m in offloaded.modules()) == 2
    expert_numel = sum(m.experts.gate_proj.numel() * 3 for m in normal.modules()
                       if isinstance(m, MoE))
    assert normal.num_parameters() - offloaded.num_parameters() == expert_numel
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = normal(ids).logits
        got = offloaded(ids).logits
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    # the same dispatch on both sides: bit for bit
    for module in normal.modules():
        if isinstance(module, MoE):
            module.cfg = module.cfg.replace(dispatch="naive")
    with torch.no_grad():
        torch.testing.assert_close(got, normal(ids).logits, rtol=0, atol=0)
    # decoding with the KV cache works through the store as well
    out = offloaded.generate(ids[:1, :4], max_new_tokens=5)
    assert torch.equal(out, normal.generate(ids[:1, :4], max_new_tokens=5))


@pytest.mark.parametrize("capacity", [1, 3, 5, 2 * E])
def test_hits_and_misses_follow_the_routing(checkpoint, capacity):
    normal = minimoe.load_pretrained(checkpoint)
    offloaded = minimoe.load_pretrained(checkpoint, offload_experts=True,
                                        expert_cache_size=capacity)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 64, (1, n), generator=generator) for n in (3, 1, 6, 2)]
    requests = _routing_trace(normal, batches)
    offloaded.expert_store.trace = []  # record the requests too
    with torch.no_grad():
        for ids in batches:
            offloaded(ids)
    hits, misses, evictions = _lru_replay(requests, capacity)
    stats = offload_stats(offloaded)
    assert offloaded.expert_store.trace == requests
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (hits, misses, evictions)
    assert misses > 0 and (capacity < 2 * E or misses == len(set(requests)))
    if capacity in (3, 5):
        assert hits > 0 and evictions > 0  # a cache that is smaller than the working set
    if capacity == 1:
        assert hits == sum(a == b for a, b in zip(requests, requests[1:]))
    # bytes: three float32 matrices of 16 x 32 per miss
    assert stats["bytes_loaded"] == misses * 3 * 16 * 32 * 4
    assert stats["cached_experts"] == min(capacity, len(set(requests)))
    assert offload_stats(normal) is None


def test_offload_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="expert_cache_size must be >= 1"):
        minimoe.load_pretrained(checkpoint, offload_experts=True, expert_cache_size=0)
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = index["weight_map"].pop(name)
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"expert 5 down_proj of layers\.2\.mlp\.experts"):
        minimoe.load_pretrained(broken, offload_experts=True)
    # a mis-shaped expert is found from the header, before any forward pass
    index["weight_map"][name] = shard
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with safe_open(str(broken / shard), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors[name] = torch.zeros(16, 32)
    save_file(tensors, str(broken / shard))
    with pytest.raises(ValueError, match=rf"{name} \(in {shard}\) has shape \(16, 32\)"):
        minimoe.load_pretrained(broken, offload_experts=True)


def test_offloaded_model_decodes_over_the_static_cache(checkpoint):
    """The static-cache decoder switches sorted-dispatch layers to the gather dispatch for its
    steps; an offloaded model's layers stay on the per-expert loop and decode the same tokens."""
    from minimoe.static_cache import generate_static

    normal = minimoe.load_pretrained(checkpoint)
    offloaded = minimoe.load_pretrained(checkpoint, offload_experts=True, expert_cache_size=3)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = normal.generate(prompt, 6)
    assert torch.equal(generate_static(offloaded, prompt, 6, compile=False), expected)
    assert torch.equal(generate_static(normal, prompt, 6, compile=False), expected)
