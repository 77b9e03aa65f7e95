"""minimoe.checkpoints.hub: which shards a layer subset needs (from an index json), the two-step download
through snapshot_download (replaced by a local fake hub: no network), and the offline /
missing-package / unknown-repo errors."""

import fnmatch
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

import minimoe
from minimoe.checkpoints import hub

huggingface_hub = pytest.importorskip("huggingface_hub")

INDEX = {
    "model.embed_tokens.weight": "model-00001-of-00005.safetensors",
    "model.layers.0.self_attn.o_proj.weight": "model-00001-of-00005.safetensors",
    "model.layers.0.mlp.down_proj.weight": "model-00002-of-00005.safetensors",
    "model.layers.1.self_attn.o_proj.weight": "model-00002-of-00005.safetensors",
    "model.layers.1.mlp.experts.0.up_proj.weight": "model-00003-of-00005.safetensors",
    "model.layers.10.mlp.gate.weight": "model-00003-of-00005.safetensors",  # 10, not 1
    "model.layers.2.mlp.gate.weight": "model-00004-of-00005.safetensors",  # MTP (2 main layers)
    "model.norm.weight": "model-00005-of-00005.safetensors",
    "lm_head.weight": "model-00005-of-00005.safetensors",
}


def test_needed_shards_follow_the_layer_subset():
    every = sorted(set(INDEX.values()))
    assert hub.needed_shards(INDEX) == every
    # layer 0: its two shards, and the shard of the head; layer 1 (and "10") not needed
    assert hub.needed_shards(INDEX, layers=[0]) == [
        "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
        "model-00005-of-00005.safetensors"]
    # layer 1 is in shards 2 and 3; "layers.10" alone would not pull shard 3 in
    assert hub.needed_shards(INDEX, layers=iter([1])) == [
        "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
        "model-00003-of-00005.safetensors", "model-00005-of-00005.safetensors"]
    assert "model-00004-of-00005.safetensors" not in hub.needed_shards(INDEX, layers=[0, 1])


def test_looks_like_repo_id(tmp_path):
    assert hub.looks_like_repo_id("deepseek-ai/DeepSeek-V3")
    for local in ("./a/b", "/abs/path", "~/x", "just-a-name", "a/b/c", "a/", str(tmp_path)):
        assert not hub.looks_like_repo_id(local), local


def _fake_hub(remote, calls):
    """snapshot_download over a local folder: copies the files matching allow_patterns."""

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append(list(allow_patterns))
        cache = remote.parent / "cache"
        cache.mkdir(exist_ok=True)
        for name in os.listdir(remote):
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                shutil.copy(remote / name, cache / name)
        return str(cache)

    return snapshot_download


def _tiny_sharded_checkpoint(folder):
    """A 3-layer dense-then-MoE minimoe model saved with one shard per layer."""
    from minimoe.checkpoints.export import save_pretrained

    cfg = minimoe.ModelConfig.preset("toy", vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=48,
                                     q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                     qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                                     moe_intermediate_size=16, n_group=1, topk_group=1,
                                     num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = minimoe.Transformer(cfg).eval()
    save_pretrained(model, folder, max_shard_size=30_000)
    return model


def test_download_fetches_only_the_needed_shards(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    model = _tiny_sharded_checkpoint(remote)
    index = json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, calls))

    part = minimoe.load_pretrained("someone/tiny-moe", layers=[0])
    assert calls[0] == hub.SMALL_FILE_PATTERNS
    wanted = hub.needed_shards(index, layers=[0])
    assert calls[1] == wanted and len(wanted) < len(set(index.values()))
    fetched = sorted(n for n in os.listdir(tmp_path / "cache") if n.endswith(".safetensors"))
    assert fetched == wanted
    # the subset loads from the partial download and equals the full model's layer 0
    torch.testing.assert_close(part.layers[0].self_attn.o_proj.weight,
                               model.layers[0].self_attn.o_proj.weight, rtol=0, atol=0)


def test_download_without_index_fetches_the_single_file(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(remote / "model.safetensors"))
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, calls))
    folder = hub.download_checkpoint("someone/single", layers=[0])
    assert calls == [hub.SMALL_FILE_PATTERNS, ["*.safetensors"]]
    assert os.path.exists(os.path.join(folder, "model.safetensors"))


def test_malformed_index_is_named(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text("{}")
    (remote / "model.safetensors.index.json").write_text('{"metadata": {}}')
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, []))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json has no 'weight_map'"):
        hub.download_checkpoint("someone/broken", layers=[0])


def test_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(hub.HubDownloadError) as info:
        minimoe.load_pretrained("deepseek-ai/DeepSeek-V3", layers=[0])
    message = str(info.value)
    assert "deepseek-ai/DeepSeek-V3" in message and "local folder" in message
    assert "no network access" in message and "--local-dir" in message


def test_unknown_repo_and_missing_package(monkeypatch):
    class RepositoryNotFoundError(Exception):
        pass

    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError("404")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(OSError, match=r"no such repository.*Pass a local folder"):
        hub.download_checkpoint("nobody/nothing")

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ImportError, match=r"needs the huggingface_hub package.*local folder"):
        minimoe.load_pretrained("nobody/nothing")


def test_repo_without_config_and_bad_local_paths(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "README.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, []))
    with pytest.raises(hub.HubDownloadError, match="no config.json"):
        hub.download_checkpoint("someone/not-a-model")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        minimoe.load_pretrained(str(tmp_path / "missing" / "folder"))


def test_needed_shards_leave_out_longcat_mtp_module_for_a_subset():
    """LongCat-Flash's MTP module is model.mtp.*, not a numbered layer: the loader skips it
    for a layer subset, so its shard is not fetched then; the whole model needs it."""
    index = {"model.embed_tokens.weight": "a.safetensors",
             "model.layers.0.self_attn.0.o_proj.weight": "a.safetensors",
             "model.mtp.layers.0.eh_proj.weight": "b.safetensors",
             "model.mtp.embed_tokens.weight": "c.safetensors",
             "lm_head.weight": "a.safetensors"}
    assert hub.needed_shards(index, layers=[0]) == ["a.safetensors"]
    assert hub.needed_shards(index) == ["a.safetensors", "b.safetensors", "c.safetensors"]
