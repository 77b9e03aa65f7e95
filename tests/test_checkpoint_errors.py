"""load_pretrained on broken checkpoints: every kind of bad input is an error that names the file
and the tensor (or config field) at fault. (Missing experts, unexpected tensors and a mis-shaped
attention weight are in test_checkpoint.py.)"""

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import minimoe
from minimoe.checkpoints.export import save_pretrained

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine")
    cfg = minimoe.ModelConfig.preset(
        "toy", vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, moe_intermediate_size=16,
        n_group=1, topk_group=1, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    save_pretrained(minimoe.Transformer(cfg), folder, max_shard_size="20KB")
    minimoe.load_pretrained(folder)  # loads as saved
    return folder


@pytest.fixture
def folder(pristine, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(pristine, copy)
    return copy


def _index(folder):
    return json.loads((folder / INDEX).read_text())


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _rewrite_shard(folder, shard, change):
    with safe_open(str(folder / shard), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(tensors)
    save_file(tensors, str(folder / shard))


def test_missing_shard_named_in_the_index(folder):
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = _index(folder)["weight_map"][name]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"is in shard '{shard}'.*which is not in"):
        minimoe.load_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_shard(folder, damage):
    shard = _index(folder)["weight_map"]["model.layers.1.mlp.experts.0.up_proj.weight"]
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 5)
    with pytest.raises(ValueError, match=rf"{shard} \(holding model\..*\) is not a readable "
                                          "safetensors file, truncated or corrupt"):
        minimoe.load_pretrained(folder)


def test_index_points_to_the_wrong_shard(folder):
    index = _index(folder)
    name = "model.norm.weight"
    other = next(s for s in sorted(set(index["weight_map"].values()))
                 if s != index["weight_map"][name])
    index["weight_map"][name] = other
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"cannot read {name} from {other}"):
        minimoe.load_pretrained(folder)


def test_malformed_json_files(folder):
    (folder / INDEX).write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=rf"{INDEX} is not valid JSON"):
        minimoe.load_pretrained(folder)
    (folder / INDEX).write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="has no 'weight_map' object"):
        minimoe.load_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list"):
        minimoe.load_pretrained(folder)


def test_unknown_model_type_and_missing_config_field(folder):
    _edit_config(folder, model_type="llama")
    with pytest.raises(NotImplementedError, match=r"model_type 'llama' in .*config\.json"):
        minimoe.load_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "deepseek_v3"
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"config\.json lacks the field 'hidden_size'"):
        minimoe.load_pretrained(folder)


def test_wrong_expert_shape(folder):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = _index(folder)["weight_map"][name]
    _rewrite_shard(folder, shard, lambda tensors: tensors.__setitem__(name, torch.zeros(16, 31)))
    with pytest.raises(ValueError, match=rf"{name} \(in {shard}\) has shape \(16, 31\).*"
                                          r"expects \(16, 32\).*experts\.up_proj\[3\]"):
        minimoe.load_pretrained(folder)


@pytest.mark.parametrize("field,value,error,pattern", [
    # a wider model than the weights: shapes disagree, the tensor and shard are named
    ("hidden_size", 48, ValueError, r"\(in model-\d+-of-\d+\.safetensors\) has shape"),
    # fewer routed experts than the file holds
    ("n_routed_experts", 4, ValueError,
     r"\(in model-\d+-of-\d+\.safetensors\) (has shape|: expert \d but the config has 4)"),
    # fewer layers than the file: the extra layer is named, with the config's numbers
    ("num_hidden_layers", 2, KeyError,
     r"model\.layers\.2\.\S+ \(in model-.*num_hidden_layers=2 .*has layers \[2\]"),
    # more layers than the file: the missing ones are named
    ("num_hidden_layers", 4, KeyError, r"not in the checkpoint .*layers\.3\."),
    # a layer the config calls dense holds MoE weights
    ("first_k_dense_replace", 2, KeyError,
     r"model\.layers\.1\.mlp\.\S+ \(in model-.*(does not have|not in the checkpoint)"),
])
def test_config_contradicting_the_weights(folder, field, value, error, pattern):
    _edit_config(folder, **{field: value})
    with pytest.raises(error, match=pattern):
        minimoe.load_pretrained(folder)


def test_missing_dense_tensor_and_fp8_without_scale(folder):
    index = _index(folder)
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = index["weight_map"].pop(name)
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"not in the checkpoint .*layers\.0\.self_attn\.o_proj"):
        minimoe.load_pretrained(folder)
    index["weight_map"][name] = shard
    (folder / INDEX).write_text(json.dumps(index))
    _rewrite_shard(folder, shard, lambda tensors: tensors.__setitem__(
        name, tensors[name].to(torch.float8_e4m3fn)))
    with pytest.raises(KeyError, match=rf"{name} \(in {shard}\) is torch.float8_e4m3fn but the "
                                       rf"checkpoint has no {name}_scale_inv"):
        minimoe.load_pretrained(folder)


@pytest.mark.parametrize("field,value,wanted", [
    ("hidden_size", "32", "an integer"),            # a string where a number belongs
    ("n_routed_experts", True, "an integer"),       # true == 1 in Python: caught, not used
    ("num_experts_per_tok", 2.5, "an integer"),     # a float count
    ("rms_norm_eps", "1e-6", "a number"),
    ("tie_word_embeddings", 0, "true or false"),
])
def test_config_field_of_the_wrong_type_is_named(folder, field, value, wanted):
    _edit_config(folder, **{field: value})
    with pytest.raises(ValueError, match=rf"config\.json: field '{field}' is .* expected {wanted}"):
        minimoe.load_pretrained(folder)
    with pytest.raises(ValueError, match=rf"field '{field}'"):
        minimoe.ModelConfig.from_hf(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_shard_decoding_to_nan_or_inf_is_named(folder, bad):
    # same file size, a few bytes changed in place: the header still parses, the values do not
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    shard = _index(folder)["weight_map"][name]
    data = bytearray((folder / shard).read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8:8 + header_size])[name]
    assert entry["dtype"] == "F32"
    element = 3 * entry["shape"][1] + 7  # row 3, column 7
    at = 8 + header_size + entry["data_offsets"][0] + 4 * element
    data[at:at + 4] = struct.pack("<f", bad)
    (folder / shard).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name} \(in {shard}\) holds NaN or inf"):
        minimoe.load_pretrained(folder)
