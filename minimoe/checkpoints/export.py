"""Writing checkpoints: a minimoe model -> a Hugging Face folder, and FP8 -> bf16 conversion.

The idea
--------
``minimoe.checkpoints.load`` reads a published checkpoint by a name mapping plus three
transformations: stack the per-expert matrices, permute the rope rows from the interleaved
to the rotate-half layout, dequantise FP8 blocks. Saving is the same mapping run backwards,
driven by the same table (``minimoe.checkpoints.family``):

* config.json: the family's ``config_to_hf``, the inverse of its ``config_from_hf``. A field
  the family's config cannot express (a softmax router in ``deepseek_v3``, shared experts in
  ``mixtral``, ...) is an error naming the field -- the file would otherwise describe a
  different function. Without ``family=``, the first family that can express the model's
  config is written (``families.infer_model_type``).
* tensors: ``to_hub`` of every minimoe name; the stacked routed experts
  ``mlp.experts.gate_proj`` (E, I, C) are cut into one tensor per expert (Mixtral:
  ``block_sparse_moe.experts.{e}.w1.weight``), fused tensors (Ling's query_key_value) are
  concatenated from their parts, MTP modules go where the family keeps them, with the copies
  of the embedding / head that DeepSeek's layout stores beside each module.
* rope rows: checkpoints of interleaved families (DeepSeek, LongCat) get the inverse of the
  permutation the loader applies (``family.to_interleaved``).
* shards: tensors in order, a new ``model-0000k-of-0000N.safetensors`` whenever the next
  tensor would pass ``max_shard_size``, and ``model.safetensors.index.json`` mapping every
  name to its shard (a single ``model.safetensors`` and no index when everything fits).

``convert_fp8_to_bf16`` rewrites a DeepSeek FP8 checkpoint (``weight`` float8_e4m3fn +
``weight_scale_inv`` float32, one scale per 128 x 128 block, see ``minimoe.fp8``) as plain
bfloat16: shard by shard, reading through memory maps (``safe_open``), so the memory in use
is one output shard plus one tensor, whatever the model's size. The scales disappear, the
index is rewritten and ``quantization_config`` leaves config.json.

What the reader should notice
-----------------------------
* Save then load is the identity (a test checks it tensor by tensor for every family), and
  transformers reads the saved folder and computes the same logits as the minimoe model.
* A published checkpoint is data plus a naming convention; nothing in it is specific to the
  code that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from minimoe.checkpoints.families import BY_MODEL_TYPE, family_of, infer_model_type
from minimoe.checkpoints.family import Family, Layout, expert_to_hub, to_hub, to_interleaved
from minimoe.checkpoints.shards import (INDEX_FILE, CheckpointFiles, parse_size, read_json,
                                        write_index, write_shards)

EXPORT_FAMILIES = tuple(BY_MODEL_TYPE)


def family_config(cfg, family: str = "deepseek_v3") -> dict:
    """The config.json of ``family`` (a model_type) that ``ModelConfig.from_hf`` maps back to
    ``cfg``. Raises ValueError naming the first field the family cannot express."""
    if family not in BY_MODEL_TYPE:
        raise ValueError(f"save_pretrained: family {family!r} is not supported; choose one of "
                         f"{EXPORT_FAMILIES}")
    return BY_MODEL_TYPE[family].config_to_hf(cfg, family)


def _fused_part_to_hub(fam: Family, name: str) -> Optional[tuple[str, tuple, str]]:
    """For the first part of a fused group (Ling's q_proj of query_key_value): (the fused
    minimoe name, its parts, the suffix); None otherwise."""
    for fused, parts in fam.names.fused.items():
        for suffix in ("weight", "bias"):
            if name.endswith(f"{parts[0]}.{suffix}"):
                prefix = name[: -len(f"{parts[0]}.{suffix}")]
                return prefix + fused, tuple(prefix + p for p in parts), suffix
    return None


def _is_fused_part(fam: Family, name: str) -> bool:
    return any(name.endswith(f"{part}.{suffix}") for parts in fam.names.fused.values()
               for part in parts[1:] for suffix in ("weight", "bias"))


def hub_tensors(model, family: str = "deepseek_v3") -> Iterator[tuple[str, torch.Tensor]]:
    """(hub name, tensor) for every tensor of the checkpoint, in the model's order; experts
    one at a time (views of the stacked parameter), rope rows in the family's layout."""
    cfg, fam = model.cfg, family_of(family, "save_pretrained(family=...)")
    table, layout = fam.names, Layout.of(model.cfg)
    interleaved = fam.rope_interleaved(fam.config_to_hf(cfg, family))
    state = model.state_dict()
    for name, tensor in state.items():
        if (name.endswith(("rotary_emb.inv_freq", "tokens_per_expert"))
                or (name.endswith("e_score_correction_bias") and not cfg.use_expert_bias)
                or (name == "lm_head.weight" and cfg.tie_word_embeddings)
                or _is_fused_part(fam, name)):
            continue
        fused = _fused_part_to_hub(fam, name)
        if fused is not None:  # one hub tensor: the parts' rows in order
            fused_name, parts, suffix = fused
            tensor = torch.cat([state[f"{part}.{suffix}"] for part in parts], dim=0)
            name = f"{fused_name}.{suffix}"
        hub = to_hub(table, name, layout)
        if name.endswith(("mlp.experts.gate_proj", "mlp.experts.up_proj",
                          "mlp.experts.down_proj")):
            for e in range(tensor.shape[0]):
                yield expert_to_hub(table, hub, e), tensor[e]
            continue
        yield hub, (to_interleaved(name, tensor, cfg) if interleaved else tensor)
    yield from _mtp_shared_copies(table, layout, state, cfg)


def _mtp_shared_copies(table, layout: Layout, state: dict, cfg):
    """The copies of the embedding / head that a family stores beside each MTP module."""
    for k in range(layout.mtp_depth):
        prefix = table.mtp.module_prefix(k, layout.num_layers)
        for hub_rest, main_name in table.mtp.shared_copies.items():
            if main_name == "lm_head.weight" and cfg.tie_word_embeddings:
                main_name = "embed_tokens.weight"
            yield prefix + hub_rest, state[main_name]


def save_pretrained(model, path: str | os.PathLike, family: Optional[str] = None,
                    max_shard_size: int | str = "5GB") -> str:
    """Write ``model`` (a minimoe Transformer) as a Hugging Face checkpoint of ``family``.

    family: a model_type (``EXPORT_FAMILIES``: "deepseek_v3", "deepseek_v2", "qwen3_moe",
    "mixtral", "olmoe", "glm4_moe", "longcat_flash", "bailing_moe_v2", ...); None = the first
    family whose config.json can express the model's config (``infer_model_type``). The config
    must be one that family can express (ValueError naming the field otherwise).
    max_shard_size: bytes, or a string like "5GB" / "40KB". Returns the folder.
    Writes config.json, the shards and, with more than one shard, the index json.
    """
    folder = os.fspath(path)
    cfg = model.cfg
    if getattr(model, "expert_store", None) is not None:
        raise ValueError("save_pretrained: this model's routed experts are offloaded (they stay "
                         "in the checkpoint it was loaded from); load it without "
                         "offload_experts to save it")
    family = family or infer_model_type(cfg)
    config = family_config(cfg, family)
    dtype = next(model.parameters()).dtype
    config["dtype"] = str(dtype).removeprefix("torch.")
    os.makedirs(folder, exist_ok=True)
    for stale in os.listdir(folder):  # a previous export's shards would confuse the index
        if stale.endswith(".safetensors") or stale == INDEX_FILE:
            os.remove(os.path.join(folder, stale))
    sizes = []

    def counted():
        for name, tensor in hub_tensors(model, family):
            sizes.append(tensor.numel() * tensor.element_size())
            yield name, tensor

    weight_map = write_shards(counted(), folder, parse_size(max_shard_size))
    if len(set(weight_map.values())) > 1:
        write_index(folder, weight_map, sum(sizes))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return folder


# ---------------------------------------------------------------------------------------------
# FP8 -> bf16, shard by shard
# ---------------------------------------------------------------------------------------------


def convert_fp8_to_bf16(source: str | os.PathLike, destination: str | os.PathLike,
                        dtype: torch.dtype = torch.bfloat16, progress: bool = False) -> dict:
    """Dequantise a block-FP8 DeepSeek checkpoint into ``dtype`` (bfloat16 by default).

    Each ``X.weight`` with an ``X.weight_scale_inv`` becomes fp8 * scale per block
    (``quantization_config.weight_block_size``, 128 x 128 by default); the scales are dropped,
    every other tensor is copied unchanged. One output shard per input shard, same names
    (a scale stored in another shard than its weight is read from there). The index is
    rewritten and ``quantization_config`` removed from config.json; the other small files
    (tokenizer, generation config) are copied. progress: a bar over the shards (the CLI's).
    Returns {"tensors", "dequantised", "shards"}.
    """
    from safetensors.torch import save_file

    caller = "convert fp8-to-bf16"
    source, destination = os.fspath(source), os.fspath(destination)
    if os.path.abspath(source) == os.path.abspath(destination):
        raise ValueError(f"{caller}: SRC and DST must be different folders")
    config_path = os.path.join(source, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{caller}: no config.json in {source}")
    config = read_json(config_path)
    files = CheckpointFiles.open(source, dtype, caller, config=config)
    config.pop("quantization_config", None)
    scales = {n for n in files.weight_map if n.endswith(".weight_scale_inv")}
    if not scales:
        raise ValueError(f"{caller}: {source} holds no *.weight_scale_inv tensors: "
                         "not a block-FP8 checkpoint")
    for scale in sorted(scales):
        if scale[: -len("_scale_inv")] not in files.weight_map:
            raise KeyError(f"{caller}: {scale} (in {files.weight_map[scale]}) has no "
                           "matching weight")
    os.makedirs(destination, exist_ok=True)
    by_file: dict[str, list[str]] = {}
    for name, file_name in files.weight_map.items():
        if name not in scales:
            by_file.setdefault(file_name, []).append(name)
    new_map, total, dequantised = {}, 0, 0
    for file_name in tqdm(sorted(by_file), desc=caller, unit="shard", disable=not progress):
        out: dict[str, torch.Tensor] = {}
        for name in by_file[file_name]:
            tensor, _ = files.read(name)
            dequantised += name + "_scale_inv" in scales
            out[name] = tensor.contiguous()
            total += tensor.numel() * tensor.element_size()
            new_map[name] = file_name
        save_file(out, os.path.join(destination, file_name), metadata={"format": "pt"})
        del out
    files.close()
    if os.path.exists(os.path.join(source, INDEX_FILE)):
        write_index(destination, new_map, total)
    _copy_small_files(source, destination)
    if config.get("torch_dtype") or "dtype" in config:
        key = "torch_dtype" if config.get("torch_dtype") else "dtype"
        config[key] = str(dtype).removeprefix("torch.")
    with open(os.path.join(destination, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return {"tensors": len(new_map), "dequantised": dequantised, "shards": len(by_file)}


def _copy_small_files(source: str, destination: str) -> None:
    """Tokenizer, generation config, chat template, README: everything but config and index."""
    for small in os.listdir(source):
        if (small.endswith((".json", ".jinja", ".model", ".txt", ".py", ".md"))
                and small not in ("config.json", INDEX_FILE)):
            shutil.copy(os.path.join(source, small), os.path.join(destination, small))
