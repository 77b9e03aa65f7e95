"""Writing checkpoints: a minimoe model -> a Hugging Face folder, and FP8 -> bf16 conversion.

The idea
--------
``minimoe.checkpoint.load_pretrained`` reads a published checkpoint by a name mapping plus
three transformations: stack the per-expert matrices, permute the rope rows from the
interleaved to the rotate-half layout, dequantise FP8 blocks. Saving is the same mapping run
backwards:

* config.json: the inverse of ``ModelConfig.from_hf`` for one family (``family_config``).
  A field the family's config cannot express (a softmax router in ``deepseek_v3``, shared
  experts in ``mixtral``, ...) is an error naming the field -- the file would otherwise
  describe a different function.
* tensors: ``layers.{i}.*`` -> ``model.layers.{i}.*``; the stacked routed experts
  ``mlp.experts.gate_proj`` (E, I, C) are cut into one tensor per expert,
  ``mlp.experts.{e}.gate_proj.weight`` (Mixtral: ``block_sparse_moe.experts.{e}.w1.weight``);
  MTP module k becomes ``model.layers.{num_hidden_layers + k}`` with DeepSeek-V3's names.
* rope rows: DeepSeek checkpoints rotate in the interleaved layout, so the rows of
  ``q_b_proj`` / ``q_proj`` and ``kv_a_proj_with_mqa`` that the loader permuted are put
  back with the inverse permutation (``rope_interleave: true`` in config.json).
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
* Save then load is the identity (a test checks it tensor by tensor), and transformers reads
  the saved folder and computes the same logits as the minimoe model.
* A published checkpoint is data plus a naming convention; nothing in it is specific to the
  code that wrote it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator, Optional

import torch

from minimoe.config import ModelConfig
from minimoe.rope import permute_rotary_rows

EXPORT_FAMILIES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral")
_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
            "eh_proj.weight": "eh_proj.weight", "final_norm.weight": "shared_head.norm.weight"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """5_000_000, "5MB" (10^6) or "5MiB" (2^20) -> bytes."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(str(size))
    if match is None:
        raise ValueError(f"max_shard_size: cannot read {size!r} (examples: 5000000, '5GB', '40KB')")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


# ---------------------------------------------------------------------------------------------
# config.json: the inverse of ModelConfig.from_hf
# ---------------------------------------------------------------------------------------------


def _rope_parameters(cfg: ModelConfig) -> dict:
    parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        parameters.update(rope_type=kind, **scaling)
    return parameters


def family_config(cfg: ModelConfig, family: str = "deepseek_v3") -> dict:
    """The config.json of ``family`` that ``ModelConfig.from_hf`` maps back to ``cfg``.

    Raises ValueError naming the first field the family cannot express.
    """
    if family not in EXPORT_FAMILIES:
        raise ValueError(f"save_pretrained: family {family!r} is not supported; choose one of "
                         f"{EXPORT_FAMILIES}")

    def need(condition: bool, field: str, wanted: str) -> None:
        if not condition:
            raise ValueError(f"save_pretrained(family={family!r}): ModelConfig.{field}="
                             f"{getattr(cfg, field)!r}, but a {family} checkpoint needs {wanted}")

    need(cfg.n_zero_experts == 0, "n_zero_experts", "0 (no zero-computation experts)")
    need(not cfg.shortcut_moe, "shortcut_moe", "False")
    need(not (cfg.mla_scale_q_lora or cfg.mla_scale_kv_lora), "mla_scale_q_lora",
         "no LongCat MLA scales")
    need(cfg.capacity_factor is None, "capacity_factor", "None (no token dropping)")
    need(cfg.is_moe, "n_routed_experts", "> 0")
    common = dict(
        architectures=[_ARCHITECTURES[family]], model_type=family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
        num_experts_per_tok=cfg.num_experts_per_tok, rope_parameters=_rope_parameters(cfg),
    )
    if family in ("deepseek_v3", "deepseek_v2"):
        need(cfg.attention == "mla", "attention", "'mla'")
        need(cfg.qk_norm == "none", "qk_norm", "'none'")
        need(cfg.partial_rotary_factor == 1.0, "partial_rotary_factor", "1.0")
        if family == "deepseek_v3":
            need(cfg.scoring_func == "sigmoid", "scoring_func", "'sigmoid'")
            need(cfg.topk_method == "noaux_tc", "topk_method", "'noaux_tc'")
            need(cfg.use_expert_bias, "use_expert_bias", "True")
        else:
            need(cfg.scoring_func == "softmax", "scoring_func", "'softmax'")
            need(cfg.topk_method in ("greedy", "group_limited_greedy"), "topk_method",
                 "'greedy' or 'group_limited_greedy'")
            need(not cfg.use_expert_bias, "use_expert_bias", "False")
        config = dict(
            common, num_key_value_heads=cfg.num_attention_heads,
            moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.first_k_dense_replace,
            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim, attention_bias=cfg.attention_bias,
            scoring_func=cfg.scoring_func, topk_method=cfg.topk_method, n_group=cfg.n_group,
            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        )
        if family == "deepseek_v3":
            config["rope_interleave"] = True  # the weights are written in DeepSeek's layout
        return config
    # GQA families
    need(cfg.attention in ("gqa", "mha"), "attention", "'gqa' or 'mha'")
    need(not cfg.attention_bias, "attention_bias", "False")
    need(cfg.partial_rotary_factor == 1.0, "partial_rotary_factor", "1.0")
    need(cfg.scoring_func == "softmax", "scoring_func", "'softmax'")
    need(cfg.topk_method == "greedy", "topk_method", "'greedy'")
    need(not cfg.use_expert_bias, "use_expert_bias", "False")
    need(cfg.n_shared_experts == 0, "n_shared_experts", "0")
    need(cfg.num_nextn_predict_layers == 0, "num_nextn_predict_layers", "0")
    common.update(num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  router_aux_loss_coef=cfg.aux_loss_alpha)
    if family == "qwen3_moe":
        need(cfg.qk_norm == "per_head", "qk_norm", "'per_head'")
        return dict(common, num_experts=cfg.n_routed_experts,
                    moe_intermediate_size=cfg.moe_intermediate_size,
                    norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                    mlp_only_layers=list(range(cfg.first_k_dense_replace)),
                    use_sliding_window=False, sliding_window=None, attention_bias=False)
    need(cfg.qk_norm == "none", "qk_norm", "'none'")
    need(cfg.first_k_dense_replace == 0, "first_k_dense_replace", "0 (every layer MoE)")
    need(cfg.norm_topk_prob, "norm_topk_prob", "True")
    return dict(common, intermediate_size=cfg.moe_intermediate_size,
                num_local_experts=cfg.n_routed_experts, sliding_window=None)


# ---------------------------------------------------------------------------------------------
# Tensors: minimoe names -> hub names
# ---------------------------------------------------------------------------------------------


def _to_interleaved(hub_name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Undo ``checkpoint._to_rotate_half``: rotate-half rows -> interleaved rows."""
    rope, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    if hub_name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        head, offset = nope + rope, nope
    elif hub_name.endswith(("self_attn.kv_a_proj_with_mqa.weight",
                            "self_attn.kv_a_proj_with_mqa.bias")):
        head, offset = cfg.kv_lora_rank + rope, cfg.kv_lora_rank
    else:
        return tensor
    forward = permute_rotary_rows(torch.arange(tensor.shape[0]), head, rope, rotary_offset=offset)
    return tensor[torch.argsort(forward)]  # loaded = saved[forward], so saved = loaded[inverse]


def hub_tensors(model, family: str = "deepseek_v3") -> Iterator[tuple[str, torch.Tensor]]:
    """(hub name, tensor) for every tensor of the checkpoint, in the model's order; experts
    one at a time (views of the stacked parameter), rope rows in the family's layout."""
    cfg = model.cfg
    interleaved = family in ("deepseek_v3", "deepseek_v2")
    n = cfg.num_hidden_layers
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(("rotary_emb.inv_freq", "tokens_per_expert")):
            continue
        if name.endswith("e_score_correction_bias") and not cfg.use_expert_bias:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("layers."):
            hub = "model." + name
        elif name.startswith("mtp."):
            k, rest = name[len("mtp."):].split(".", 1)
            prefix = f"model.layers.{n + int(k)}."
            hub = prefix + (_MTP_OWN[rest] if rest in _MTP_OWN else rest[len("block."):])
        elif name == "lm_head.weight":
            hub = name
        else:
            hub = "model." + name
        stacked = re.match(r"^(.*)mlp\.experts\.(gate_proj|up_proj|down_proj)$", hub)
        if stacked is not None:
            prefix, proj = stacked.groups()
            for e in range(tensor.shape[0]):
                if family == "mixtral":
                    yield (f"{prefix}block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[proj]}.weight",
                           tensor[e])
                else:
                    yield f"{prefix}mlp.experts.{e}.{proj}.weight", tensor[e]
            continue
        if family == "mixtral" and hub.endswith("mlp.gate.weight"):
            hub = hub[: -len("mlp.gate.weight")] + "block_sparse_moe.gate.weight"
        if interleaved:
            tensor = _to_interleaved(hub, tensor, cfg)
        yield hub, tensor
        if name.startswith("mtp.") and name.endswith("final_norm.weight"):
            # DeepSeek-V3 stores copies of the embedding and head in each MTP layer
            prefix = hub[: -len("shared_head.norm.weight")]
            yield prefix + "embed_tokens.weight", state["embed_tokens.weight"]
            yield prefix + "shared_head.head.weight", state[
                "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: str, max_bytes: int,
                  metadata: Optional[dict] = None) -> dict[str, str]:
    """Write (name, tensor) pairs into shards of at most max_bytes (a larger single tensor gets
    a shard of its own); returns {name: file}. Only the current shard is held in memory."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    temporary = []

    def flush() -> None:
        nonlocal current, size
        if current:
            path = os.path.join(folder, f".shard-{len(temporary):05d}.tmp")
            save_file(current, path, metadata={"format": "pt", **(metadata or {})})
            temporary.append(path)
            shards.append(list(current))
        current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        current[name] = tensor.detach().to("cpu").contiguous().clone()  # (own storage)
        size += nbytes
    flush()
    weight_map = {}
    total = len(temporary)
    for k, (path, names) in enumerate(zip(temporary, shards)):
        file_name = ("model.safetensors" if total == 1
                     else f"model-{k + 1:05d}-of-{total:05d}.safetensors")
        os.replace(path, os.path.join(folder, file_name))
        weight_map.update({name: file_name for name in names})
    return weight_map


def _write_index(folder: str, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump(index, handle, indent=2)


def save_pretrained(model, path: str | os.PathLike, family: str = "deepseek_v3",
                    max_shard_size: int | str = "5GB") -> str:
    """Write ``model`` (a minimoe Transformer) as a Hugging Face checkpoint of ``family``.

    family: "deepseek_v3" (default), "deepseek_v2", "qwen3_moe" or "mixtral"; the model's
    config must be one that family can express (ValueError naming the field otherwise).
    max_shard_size: bytes, or a string like "5GB" / "40KB". Returns the folder.
    Writes config.json, the shards and, with more than one shard, the index json.
    """
    folder = os.fspath(path)
    cfg = model.cfg
    if getattr(model, "expert_store", None) is not None:
        raise ValueError("save_pretrained: this model's routed experts are offloaded (they stay "
                         "in the checkpoint it was loaded from); load it without "
                         "offload_experts to save it")
    config = family_config(cfg, family)
    dtype = next(model.parameters()).dtype
    config["dtype"] = str(dtype).removeprefix("torch.")
    os.makedirs(folder, exist_ok=True)
    for stale in os.listdir(folder):  # a previous export's shards would confuse the index
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(folder, stale))
    sizes = []

    def counted():
        for name, tensor in hub_tensors(model, family):
            sizes.append(tensor.numel() * tensor.element_size())
            yield name, tensor

    weight_map = _write_shards(counted(), folder, parse_size(max_shard_size))
    if len(set(weight_map.values())) > 1:
        _write_index(folder, weight_map, sum(sizes))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return folder


# ---------------------------------------------------------------------------------------------
# FP8 -> bf16, shard by shard
# ---------------------------------------------------------------------------------------------


def convert_fp8_to_bf16(source: str | os.PathLike, destination: str | os.PathLike,
                        dtype: torch.dtype = torch.bfloat16) -> dict:
    """Dequantise a block-FP8 DeepSeek checkpoint into ``dtype`` (bfloat16 by default).

    Each ``X.weight`` with an ``X.weight_scale_inv`` becomes fp8 * scale per block
    (``quantization_config.weight_block_size``, 128 x 128 by default); the scales are dropped,
    every other tensor is copied unchanged. One output shard per input shard, same names
    (a scale stored in another shard than its weight is read from there). The index is
    rewritten and ``quantization_config`` removed from config.json; the other small files
    (tokenizer, generation config) are copied. Returns {"tensors", "dequantised", "shards"}.
    """
    import shutil

    from safetensors.torch import save_file

    from minimoe.checkpoint import (_read_json, check_scale_format, checkpoint_weight_map,
                                    open_shard, read_weight, shard_handles)

    source, destination = os.fspath(source), os.fspath(destination)
    if os.path.abspath(source) == os.path.abspath(destination):
        raise ValueError("convert fp8-to-bf16: SRC and DST must be different folders")
    config_path = os.path.join(source, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"convert fp8-to-bf16: no config.json in {source}")
    config = _read_json(config_path)
    quant = config.pop("quantization_config", None) or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    scale_fmt = check_scale_format(quant, config_path, "convert fp8-to-bf16")
    weight_map = checkpoint_weight_map(source)
    scales = {n for n in weight_map if n.endswith(".weight_scale_inv")}
    if not scales:
        raise ValueError(f"convert fp8-to-bf16: {source} holds no *.weight_scale_inv tensors: "
                         "not a block-FP8 checkpoint")
    for scale in sorted(scales):
        if scale[: -len("_scale_inv")] not in weight_map:
            raise KeyError(f"convert fp8-to-bf16: {scale} (in {weight_map[scale]}) has no "
                           "matching weight")
    os.makedirs(destination, exist_ok=True)
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        if name not in scales:
            by_file.setdefault(file_name, []).append(name)
    new_map, total, dequantised = {}, 0, 0
    for file_name in sorted(by_file):
        out: dict[str, torch.Tensor] = {}
        with open_shard(source, file_name, by_file[file_name][0]) as handle:
            handle_of = shard_handles(source, file_name, handle)
            for name in by_file[file_name]:
                tensor, _ = read_weight(handle_of, name, file_name, weight_map, block, dtype,
                                        scale_fmt, "convert fp8-to-bf16")
                dequantised += name + "_scale_inv" in scales
                out[name] = tensor.contiguous()
                total += tensor.numel() * tensor.element_size()
                new_map[name] = file_name
        save_file(out, os.path.join(destination, file_name), metadata={"format": "pt"})
        del out
    if os.path.exists(os.path.join(source, "model.safetensors.index.json")):
        _write_index(destination, new_map, total)
    for small in os.listdir(source):
        if (small.endswith((".json", ".jinja", ".model", ".txt", ".py", ".md"))
                and small not in ("config.json", "model.safetensors.index.json")):
            shutil.copy(os.path.join(source, small), os.path.join(destination, small))
    if config.get("torch_dtype") or "dtype" in config:
        key = "torch_dtype" if config.get("torch_dtype") else "dtype"
        config[key] = str(dtype).removeprefix("torch.")
    with open(os.path.join(destination, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return {"tensors": len(new_map), "dequantised": dequantised, "shards": len(by_file)}
