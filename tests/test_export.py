"""minimoe.checkpoints.export: save_pretrained writes a folder that transformers 5.23 loads with the same
logits as the minimoe model (DeepSeek-V3 with interleaved rope rows, Qwen3-MoE, Mixtral) and
that load_pretrained reads back tensor for tensor; convert_fp8_to_bf16 dequantises a sharded
FP8 checkpoint into one that loads equal to the FP8 load."""

import json

import pytest
import torch
from safetensors import safe_open

import minimoe
from hf_weights import PARITY_ATOL, randomise
from minimoe.config import ModelConfig
from minimoe.checkpoints.export import convert_fp8_to_bf16, family_config, parse_size, save_pretrained

transformers = pytest.importorskip("transformers")
from hf_weights import read_all  # noqa: E402
from test_checkpoint import V2_BASE, V3_BASE, _quantise_blocks, _save_hf  # noqa: E402
from test_checkpoint_families import BASE, FAMILIES  # noqa: E402
from test_checkpoint_ling import BASE as LING_BASE, ling_reference_logits  # noqa: E402
from test_checkpoint_longcat import BASE as LONGCAT_BASE, CASES as LONGCAT_CASES  # noqa: E402

ALL_FAMILIES = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral", "olmoe", "glm4_moe",
                "longcat_flash", "bailing_moe_v2"]
MTP_FAMILIES = ["deepseek_v3", "glm4_moe", "longcat_flash", "bailing_moe_v2"]


class LING_CONFIG:  # Ling's config.json as a dict (transformers has no class for it)
    to_dict = staticmethod(lambda: dict(LING_BASE))

SEQ = 20
ATOL = PARITY_ATOL  # measured <= 4.1e-6 (see hf_weights)


def _minimoe_model(family, seed, **changes):
    """A random minimoe model whose config comes from the family's transformers config."""
    if family == "deepseek_v3":
        hf_config = transformers.DeepseekV3Config(**V3_BASE)
    elif family == "deepseek_v2":
        hf_config = transformers.DeepseekV2Config(**V2_BASE)
    elif family == "bailing_moe_v2":
        hf_config = LING_CONFIG
    elif family == "longcat_flash":
        hf_config = transformers.LongcatFlashConfig(**LONGCAT_BASE,
                                                    **LONGCAT_CASES["bias-yarn"])
    else:
        config_class, _, cases = FAMILIES.get(family, ("", "", {"": {}}))
        hf_config = getattr(transformers, config_class)(**{**BASE, **next(iter(cases.values()))})
    cfg = ModelConfig.from_hf(hf_config.to_dict()).replace(**changes)
    torch.manual_seed(seed)
    return randomise(minimoe.Transformer(cfg).eval(), seed)


def _add_identity_expert_rows(model, folder):
    """transformers 5.23's LongcatFlash keeps a fused gate_up_proj with rows for the identity
    experts too (never used) and refuses a checkpoint without them; the published checkpoints
    (and minimoe's export, which writes their layout) have none. Zeros stand in, in a shard of
    their own, for transformers only."""
    from safetensors.torch import save_file

    cfg = model.cfg
    extra = {}
    for i in range(cfg.num_hidden_layers):
        for e in range(cfg.n_routed_experts, cfg.n_routed_experts + cfg.n_zero_experts):
            for proj in ("gate_proj", "up_proj"):
                extra[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] = torch.zeros(
                    cfg.moe_intermediate_size, cfg.hidden_size)
    save_file(extra, str(folder / "identity-experts.safetensors"))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({name: "identity-experts.safetensors" for name in extra})
    index_path.write_text(json.dumps(index))


def _hf_logits(folder, ids):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return hf_model.eval()(ids).logits


def _check_reloads_bit_identical(model, folder):
    loaded = minimoe.load_pretrained(folder)
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        if name.endswith("tokens_per_expert"):
            continue
        if name.endswith("e_score_correction_bias") and not model.cfg.use_expert_bias:
            continue  # unused without a selection bias; not in these families' files
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "bailing_moe_v2"])
def test_transformers_loads_the_export_with_the_same_logits(family, tmp_path):
    model = _minimoe_model(family, seed=3, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path, family=family, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    last = model.cfg.num_hidden_layers - 1
    expert = (f"model.layers.{last}.block_sparse_moe.experts.1.w3.weight" if family == "mixtral"
              else f"model.layers.{last}.mlp.experts.1.up_proj.weight")
    assert expert in index
    for name, file_name in index.items():  # the index tells the truth
        with safe_open(str(tmp_path / file_name), framework="pt") as handle:
            assert name in handle.keys()
    ids = torch.randint(0, model.cfg.vocab_size, (2, SEQ),
                        generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
    _check_reloads_bit_identical(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    if family == "longcat_flash":
        _add_identity_expert_rows(model, tmp_path)
    assert (_hf_logits(tmp_path, ids) - expected).abs().max().item() <= ATOL


def test_ling_export_matches_the_independent_forward(tmp_path):
    # transformers has no Ling-2.0 class: the saved tensors go through the tests' own forward
    model = _minimoe_model("bailing_moe_v2", seed=3)
    save_pretrained(model, tmp_path, max_shard_size="40KB")  # inferred: only Ling fits
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bailing_moe_v2"
    tensors = read_all(tmp_path)
    assert "model.layers.1.attention.query_key_value.weight" in tensors  # q, k, v fused
    ids = torch.randint(0, model.cfg.vocab_size, (2, SEQ),
                        generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ling_reference_logits(tensors, config, ids, range(config["num_hidden_layers"]))
        assert (model(ids).logits - expected).abs().max().item() <= ATOL
    _check_reloads_bit_identical(model, tmp_path)


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_modules_round_trip(family, tmp_path):
    model = _minimoe_model(family, seed=9, num_nextn_predict_layers=1)
    assert len(model.mtp) == 1
    save_pretrained(model, tmp_path, family=family, max_shard_size="40KB")
    names = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    n = model.cfg.num_hidden_layers
    where = {"longcat_flash": "model.mtp.layers.0.eh_proj.weight"}.get(
        family, f"model.layers.{n}.eh_proj.weight")
    assert where in names
    _check_reloads_bit_identical(model, tmp_path)


def test_deepseek_rope_rows_are_written_interleaved(tmp_path):
    # a rotate-half q_b_proj saved interleaved: rope rows of each head reordered, others kept
    model = _minimoe_model("deepseek_v3", seed=5, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path, max_shard_size="1MB")
    assert json.loads((tmp_path / "config.json").read_text())["rope_interleave"] is True
    saved = read_all(tmp_path)["model.layers.0.self_attn.q_b_proj.weight"]
    ours = model.layers[0].self_attn.q_b_proj.weight.detach()
    nope, rope = model.cfg.qk_nope_head_dim, model.cfg.qk_rope_head_dim
    for head in range(model.cfg.num_attention_heads):
        base = head * (nope + rope)
        torch.testing.assert_close(saved[base:base + nope], ours[base:base + nope])
        half = ours[base + nope:base + nope + rope]  # rotate-half: [x_0..x_{r/2-1}, y_0..]
        interleaved = saved[base + nope:base + nope + rope]  # [x_0, y_0, x_1, y_1, ...]
        torch.testing.assert_close(interleaved[0::2], half[: rope // 2])
        torch.testing.assert_close(interleaved[1::2], half[rope // 2:])


def test_mtp_modules_round_trip_and_single_file(tmp_path):
    model = _minimoe_model("deepseek_v3", seed=6)
    assert len(model.mtp) == 1
    save_pretrained(model, tmp_path)  # 5GB default: one model.safetensors, no index
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    names = read_all(tmp_path)
    n = model.cfg.num_hidden_layers
    assert f"model.layers.{n}.eh_proj.weight" in names
    assert f"model.layers.{n}.shared_head.head.weight" in names  # DeepSeek-V3's copy
    loaded = minimoe.load_pretrained(tmp_path)
    ids = torch.randint(0, model.cfg.vocab_size, (1, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for name, tensor in loaded.mtp.state_dict().items():
        if not name.endswith("tokens_per_expert"):
            torch.testing.assert_close(tensor, model.mtp.state_dict()[name], rtol=0, atol=0)


def test_family_config_refuses_what_the_family_cannot_say():
    classic = ModelConfig.preset("toy-classic")
    with pytest.raises(ValueError, match=r"scoring_func='softmax'.*deepseek_v3"):
        family_config(classic, "deepseek_v3")
    with pytest.raises(ValueError, match=r"attention='mla'"):
        family_config(ModelConfig.preset("toy"), "qwen3_moe")
    with pytest.raises(ValueError, match=r"family 'llama'"):
        family_config(ModelConfig.preset("toy"), "llama")
    assert family_config(ModelConfig.preset("toy"))["n_routed_experts"] == 16
    # MTP modules trained on the pre-norm state would be fed the normed one by every runtime
    with pytest.raises(ValueError, match=r"mtp_input='pre_norm'.*post_norm"):
        family_config(ModelConfig.preset("toy", mtp_input="pre_norm"), "deepseek_v3")
    assert family_config(ModelConfig.preset("toy", mtp_input="pre_norm",
                                            num_nextn_predict_layers=0), "deepseek_v3")
    assert parse_size("40KB") == 40_000 and parse_size("1MiB") == 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_an_offloaded_model_cannot_be_saved(tmp_path):
    model = _minimoe_model("deepseek_v3", seed=8, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path / "a")
    offloaded = minimoe.load_pretrained(tmp_path / "a", offload_experts=True)
    with pytest.raises(ValueError, match="offloaded"):
        save_pretrained(offloaded, tmp_path / "b")


def test_convert_fp8_to_bf16(tmp_path):
    _save_hf("v3", dict(intermediate_size=200, vocab_size=136), tmp_path / "bf", 11)
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    config["num_nextn_predict_layers"] = 0
    tensors = []
    for name, tensor in read_all(tmp_path / "bf").items():
        if (tensor.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name
                and not name.endswith("mlp.gate.weight")):
            qweight, scales = _quantise_blocks(tensor)
            tensors += [(name, qweight), (name + "_scale_inv", scales)]
        else:
            tensors.append((name, tensor))
    # write the FP8 checkpoint sharded, with an index, a tokenizer file alongside
    from minimoe.checkpoints.shards import write_index as _write_index, write_shards as _write_shards

    source = tmp_path / "fp8"
    source.mkdir()
    weight_map = _write_shards(iter(tensors), str(source), 30_000)
    _write_index(str(source), weight_map, 0)
    (source / "config.json").write_text(json.dumps(config))
    (source / "tokenizer_config.json").write_text("{}")
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 3

    report = convert_fp8_to_bf16(source, tmp_path / "bf16")
    out = tmp_path / "bf16"
    assert report["shards"] == len(shards)
    assert report["dequantised"] == sum(n.endswith("_scale_inv") for n, _ in tensors)
    new_config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in new_config
    assert (out / "tokenizer_config.json").exists()
    new_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.endswith("_scale_inv") for n in new_map)
    assert set(new_map) == {n for n, _ in tensors if not n.endswith("_scale_inv")}
    converted = read_all(out)
    assert all(t.dtype != torch.float8_e4m3fn for t in converted.values())
    assert converted["model.layers.1.mlp.experts.2.gate_proj.weight"].dtype == torch.bfloat16

    fp8_model = minimoe.load_pretrained(source, dtype=torch.bfloat16)
    bf16_model = minimoe.load_pretrained(out, dtype=torch.bfloat16)
    fp8_state = fp8_model.state_dict()
    for name, tensor in bf16_model.state_dict().items():
        torch.testing.assert_close(tensor, fp8_state[name], rtol=0, atol=0, msg=name)

    # offloaded experts are dequantised on demand from the FP8 shards: the same logits
    offloaded = minimoe.load_pretrained(source, dtype=torch.bfloat16, offload_experts=True,
                                        expert_cache_size=4)
    for module in bf16_model.modules():  # the per-expert dispatch on both sides (bfloat16
        if hasattr(module, "experts"):    # rounds grouped and per-expert sums differently)
            module.cfg = module.cfg.replace(dispatch="naive")
    ids = torch.randint(0, 136, (1, 12), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, bf16_model(ids).logits, rtol=0, atol=0)
    assert offloaded.expert_store.stats()["misses"] > 0

    with pytest.raises(ValueError, match="no \\*.weight_scale_inv"):
        convert_fp8_to_bf16(out, tmp_path / "again")

    # quantization_config.scale_fmt holds for every reader: "ue8m0" scales must be powers of
    # two (these are amax / 448), an unknown format is refused
    config["quantization_config"]["scale_fmt"] = "ue8m0"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight_scale_inv \(in model-\d+-of-\d+\.safetensors\)"
                                         r".*not a positive power of two"):
        convert_fp8_to_bf16(source, tmp_path / "ue8m0")
    offloaded.expert_store.files.scale_fmt = "ue8m0"
    offloaded.expert_store.cache.clear()
    with pytest.raises(ValueError, match=r"experts\.\d+\.\w+_proj\.weight_scale_inv.*power of two"):
        with torch.no_grad():
            offloaded(ids)
    config["quantization_config"]["scale_fmt"] = "e5m2"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"convert fp8-to-bf16: quantization_config\.scale_fmt "
                                         r"'e5m2' in .*config\.json is not known"):
        convert_fp8_to_bf16(source, tmp_path / "e5m2")
