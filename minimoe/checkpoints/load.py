"""Loading published checkpoints: a Hugging Face folder (or hub repo id) -> a minimoe model.

The idea
--------
Loading is a *name mapping* plus three transformations, and nothing else changes between the
published file and the model:

1. the name mapping: the checkpoint family's table (``minimoe.checkpoints.family``) maps each
   hub tensor name to a minimoe parameter (``model.layers.3.self_attn.o_proj.weight`` ->
   ``layers.3.self_attn.o_proj.weight``);
2. stack the experts: minimoe keeps the routed experts stacked (``minimoe.experts.RoutedExperts``),
   so ``mlp.experts.{e}.gate_proj.weight`` (I, C) becomes slice ``[e]`` of
   ``mlp.experts.gate_proj`` (E, I, C); the loader allocates the stacked tensor once and copies
   each expert's matrix into its slice (fused tensors such as Ling's query_key_value are cut
   into their parts the same way);
3. permute the rope rows of checkpoints that rotate interleaved (DeepSeek, LongCat) into
   minimoe's rotate-half layout (``family.to_rotate_half``);
4. dequantise FP8 blocks (``minimoe.checkpoints.shards``).

The loader builds the model on the meta device (no memory), maps every checkpoint name first
(so a tensor with no place is an error before anything is read), then reads the shards one
tensor at a time and copies each into its place: the largest extra memory at any moment is one
checkpoint tensor (plus its dtype conversion; for an FP8 weight, its float32 dequantisation),
never a second copy of the model.

MTP modules. The checkpoint decides whether they are built: transformers' DeepseekV3 and
LongcatFlash have no MTP module, so the checkpoints they save carry none although a config may
say num_nextn_predict_layers = 1; then the model is built without MTP (with a warning for
DeepSeek) rather than with random MTP weights. LongCat-Flash's config.json does not count its
one module: it is built exactly when the checkpoint holds ``model.mtp.*`` tensors. With
``layers=`` (a subset of the main layers) the MTP modules, which follow the last main layer,
are skipped.

What the reader should notice
-----------------------------
* Every tensor of the file lands somewhere and every parameter of the model comes from the
  file: a missing, unexpected or mis-shaped tensor is an error naming the tensor and file.
* A family is data (its table); this loader is the same for all of them.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Iterable, Optional

import torch

from minimoe.checkpoints.families import family_of
from minimoe.checkpoints.family import SKIP, Family, Layout, to_minimoe, to_rotate_half
from minimoe.checkpoints.shards import CheckpointFiles, read_json, weight_map_of
from minimoe.config import ModelConfig
from minimoe.model import Transformer
from minimoe.rope import RotaryEmbedding


def resolve_checkpoint_folder(path_or_repo_id: str | os.PathLike,
                              layers: Optional[Iterable[int]] = None) -> str:
    """A local folder as is; a hub repo id is fetched by ``minimoe.checkpoints.hub``
    (only the shards that hold ``layers``, when given)."""
    from minimoe.checkpoints.hub import download_checkpoint, looks_like_repo_id

    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if not looks_like_repo_id(path):
        raise FileNotFoundError(f"load_pretrained: {path!r} is not a folder (a local checkpoint "
                                "folder holds config.json and *.safetensors), nor a hub repo id "
                                "of the form 'owner/name'")
    return download_checkpoint(path, layers=layers)


# ------------------------------------------------------------------ the config and the plan
def mtp_modules_present(family: Family, weight_map: dict, num_layers: int, depth: int) -> int:
    """How many MTP modules the checkpoint holds tensors for (see the module docstring)."""
    mtp = family.names.mtp
    if "{index}" not in mtp.prefix:  # LongCat-Flash: one module under a fixed prefix
        present = [any(name.startswith(mtp.prefix) for name in weight_map)]
        if present[0]:
            return 1  # whatever config.json says (it does not count the module)
    else:
        present = [any(n.startswith(mtp.module_prefix(k, num_layers)) for n in weight_map)
                   for k in range(depth)]
    if depth and not any(present):
        warnings.warn(f"config.json says num_nextn_predict_layers={depth} but the checkpoint "
                      f"holds no {mtp.module_prefix(0, num_layers)}* tensors (checkpoints saved "
                      "by transformers carry no MTP module); building the model without MTP",
                      stacklevel=4)
        return 0
    return depth


def model_config(cfg: ModelConfig, layers: Optional[list[int]], mtp_depth: int) -> ModelConfig:
    """The config of the model to build: a layer subset (no MTP) or the whole model."""
    if layers is None:
        return cfg.replace(num_nextn_predict_layers=mtp_depth)
    dense = sum(1 for i in layers if i < cfg.first_k_dense_replace)
    return cfg.replace(num_hidden_layers=len(layers), first_k_dense_replace=dense,
                       num_nextn_predict_layers=0)


def plan_tensors(files: CheckpointFiles, family: Family, layout: Layout) -> dict:
    """{checkpoint name: (minimoe name, expert index or None)} for every tensor to read.

    Scales travel with their weight and inv_freq is recomputed; a tensor with no place in the
    model, or a scale without its weight, is an error naming it and its file.
    """
    weight_map = files.weight_map
    scales = {n for n in weight_map if n.endswith(".weight_scale_inv")}
    plan, unexpected = {}, []
    for name in weight_map:
        if name in scales or name.endswith("rotary_emb.inv_freq"):
            continue
        target = to_minimoe(family.names, name, layout)
        if target is None:
            unexpected.append(name)
        elif target != SKIP:
            plan[name] = target
    if unexpected:
        listing = ", ".join(f"{n} (in {weight_map[n]})" for n in sorted(unexpected)[:10])
        beyond = sorted({int(m.group(1)) for m in map(re.compile(r"^model\.layers\.(\d+)\.").match,
                                                      unexpected) if m
                         and int(m.group(1)) >= layout.num_layers})
        hint = (f" (config.json says num_hidden_layers={layout.num_layers} and "
                f"num_nextn_predict_layers={layout.mtp_depth}, but the checkpoint "
                f"has layers {beyond[:5]})" if beyond else "")
        raise KeyError(f"load_pretrained: {len(unexpected)} checkpoint tensor(s) have no place in "
                       f"the minimoe model: {listing}{hint}")
    for scale_name in scales:
        if scale_name[: -len("_scale_inv")] not in weight_map:
            raise KeyError(f"load_pretrained: {scale_name} (in {weight_map[scale_name]}) has no "
                           "matching weight")
    return plan


# ------------------------------------------------------------------------ placing tensors
class Placement:
    """The model's tensors as they arrive: checks each against the meta model and stores it.

    targets: {minimoe name: meta tensor} still to fill; loaded: {minimoe name: real tensor};
    stacked experts are allocated on their first expert and filled slice by slice.
    """

    def __init__(self, model: Transformer, family: Family, files: CheckpointFiles,
                 device: torch.device, interleaved: bool) -> None:
        self.cfg = model.cfg
        self.family, self.files = family, files
        self.dtype, self.device, self.interleaved = files.dtype, device, interleaved
        self.targets = dict(model.state_dict(keep_vars=True))  # minimoe name -> meta tensor
        if self.cfg.tie_word_embeddings:
            self.targets.pop("lm_head.weight", None)
        self.loaded: dict[str, torch.Tensor] = {}
        self.filled_experts: dict[str, set] = {}  # stacked minimoe name -> experts filled

    def place(self, name: str, tensor: torch.Tensor, target: tuple) -> None:
        """Check the shape, convert, permute rope rows if needed, store one tensor."""
        minimoe_name, expert = target
        fused = self._fused_parts(minimoe_name)
        if fused is not None:
            self._place_fused(name, tensor, minimoe_name, fused)
            return
        where = f"{name} (in {self._file(name)})"
        if minimoe_name not in self.targets:
            raise KeyError(f"load_pretrained: {where} maps to {minimoe_name}, which the minimoe "
                           "model built from config.json does not have")
        meta = self.targets[minimoe_name]
        wanted = tuple(meta.shape[1:]) if expert is not None else tuple(meta.shape)
        if tuple(tensor.shape) != wanted:
            raise ValueError(f"load_pretrained: {where} has shape {tuple(tensor.shape)}; the model "
                             f"built from config.json expects {wanted} for {minimoe_name}"
                             f"{'' if expert is None else f'[{expert}]'}")
        keep_float32 = minimoe_name.endswith("e_score_correction_bias")
        tensor = tensor.to(device=self.device, dtype=torch.float32 if keep_float32 else self.dtype)
        if self.interleaved:
            tensor = to_rotate_half(minimoe_name, tensor, self.cfg)
        if expert is None:
            self.loaded[minimoe_name] = tensor
            return
        if expert >= meta.shape[0]:
            raise ValueError(f"load_pretrained: {where}: expert {expert} but the config has "
                             f"{meta.shape[0]} routed experts")
        if minimoe_name not in self.loaded:
            self.loaded[minimoe_name] = torch.empty(meta.shape, dtype=self.dtype,
                                                    device=self.device)  # (E, ., .)
            self.filled_experts[minimoe_name] = set()
        self.loaded[minimoe_name][expert].copy_(tensor)
        self.filled_experts[minimoe_name].add(expert)

    def _fused_parts(self, minimoe_name: str):
        for fused, parts in self.family.names.fused.items():
            match = re.match(rf"^(.*){re.escape(fused)}\.(weight|bias)$", minimoe_name)
            if match is not None:
                return [f"{match.group(1)}{part}.{match.group(2)}" for part in parts]
        return None

    def _place_fused(self, name: str, tensor: torch.Tensor, minimoe_name: str, parts: list):
        """One hub tensor holding its parts' rows in order (Ling: q, then k, then v)."""
        sizes = [self.targets[part].shape[0] if part in self.targets else 0 for part in parts]
        if tensor.shape[0] != sum(sizes) or 0 in sizes:
            raise ValueError(f"load_pretrained: {name} (in {self._file(name)}) has "
                             f"{tensor.shape[0]} rows; the config's {' + '.join(parts)} have "
                             f"{' + '.join(map(str, sizes))} = {sum(sizes)} (for "
                             f"query_key_value: (H + 2 H_kv) * head_dim)")
        for part, rows in zip(parts, tensor.split(sizes, dim=0)):
            self.place(name, rows, (part, None))

    def _file(self, name: str) -> str:
        return self.files.weight_map[name]

    def check_complete(self, folder: str) -> None:
        """Everything the model needs must have come from the file."""
        missing = []
        for minimoe_name, meta in self.targets.items():
            if minimoe_name in self.filled_experts:
                absent = sorted(set(range(meta.shape[0])) - self.filled_experts[minimoe_name])
                if absent:
                    missing.append(f"{minimoe_name} experts {absent[:8]}")
            elif minimoe_name not in self.loaded:
                if (minimoe_name.endswith("gate.e_score_correction_bias")
                        and not self.cfg.use_expert_bias):  # unused: zeros, as the model has
                    self.loaded[minimoe_name] = torch.zeros(meta.shape, device=self.device)
                else:
                    missing.append(minimoe_name)
        if missing:
            raise KeyError(f"load_pretrained: {len(missing)} model tensor(s) are not in the "
                           f"checkpoint {folder}: {', '.join(missing[:10])}")


def _materialise_buffers(model: Transformer, device) -> None:
    """Non-persistent buffers are not in checkpoints: compute them on the target device."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if isinstance(module, RotaryEmbedding) and name == "inv_freq":
                fresh = RotaryEmbedding(module.rotary_dim, module.theta,
                                        module.max_position_embeddings, module.rope_scaling)
                module._buffers[name] = fresh.inv_freq.to(device)
            elif name == "tokens_per_expert":
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
            else:
                raise RuntimeError(f"load_pretrained: no rule to create buffer {name!r} of "
                                   f"{type(module).__name__}")


def _default_dtype(hf: dict) -> torch.dtype:
    """The config's torch_dtype / dtype when it names a float type of >= 16 bits, else float32."""
    named = hf.get("torch_dtype", hf.get("dtype"))
    dtype = getattr(torch, named) if isinstance(named, str) and hasattr(torch, named) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        return torch.float32
    return dtype


def _layer_list(layers, num_layers: int) -> Optional[list[int]]:
    if layers is None:
        return None
    layer_list = sorted(set(int(i) for i in layers))
    if not layer_list or layer_list[0] < 0 or layer_list[-1] >= num_layers:
        raise ValueError(f"layers must be a non-empty set of indices in [0, {num_layers}), "
                         f"got {layer_list}")
    return layer_list


# ------------------------------------------------------------------------------ the loader
def load_pretrained(path_or_repo_id: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                    device: str | torch.device = "cpu",
                    layers: Optional[Iterable[int]] = None, offload_experts: bool = False,
                    expert_cache_size: int = 64) -> Transformer:
    """Build a ``Transformer`` from a Hugging Face checkpoint (see the module docstring).

    path_or_repo_id: a local folder (works offline) or a hub repo id ("deepseek-ai/...").
    dtype: of the parameters; None = the config's ``torch_dtype``/``dtype`` (float32 when it
        names none). FP8 weights are dequantised into it; the router's selection bias stays
        float32.
    layers: None = the whole model (with its MTP modules when the file has them); an iterable
        of layer indices (e.g. range(4)) = the embedding, those blocks in order, the final norm
        and the head (no MTP). Handy for looking at the first layers of a huge model.
    offload_experts: keep the routed experts on disk and read them on demand through an LRU
        cache of ``expert_cache_size`` experts (``minimoe.checkpoints.offload``; inference only,
        naive dispatch; counters in ``model.expert_store.stats()``).
    Returns the model in eval mode.
    """
    layers = None if layers is None else list(layers)
    folder = resolve_checkpoint_folder(path_or_repo_id, layers)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"load_pretrained: no config.json in {folder}")
    hf = read_json(config_path)
    family = family_of(hf.get("model_type"), config_path)
    full_cfg = ModelConfig.from_hf(config_path)
    dtype = _default_dtype(hf) if dtype is None else dtype
    weight_map = weight_map_of(folder)
    num_layers = full_cfg.num_hidden_layers  # LongCat: num_layers (two sublayers each)
    layer_list = _layer_list(layers, num_layers)
    depth = 0 if layer_list is not None else mtp_modules_present(
        family, weight_map, num_layers, full_cfg.num_nextn_predict_layers)
    files = CheckpointFiles.open(folder, dtype, config=hf, weight_map=weight_map)
    cfg = model_config(full_cfg, layer_list, depth)
    if offload_experts:
        cfg = cfg.replace(dispatch="naive")  # per-expert calls: what the offloaded store serves
    layer_position = None if layer_list is None else {i: j for j, i in enumerate(layer_list)}
    plan = plan_tensors(files, family, Layout.of(cfg, layer_position, num_layers))

    with torch.device("meta"):  # the module tree without storage: every tensor comes from the file
        model = Transformer(cfg)
    placement = Placement(model, family, files, torch.device(device), family.rope_interleaved(hf))
    expert_plan = {}
    if offload_experts:  # routed experts are read later, on demand
        expert_plan = {n: t for n, t in plan.items() if t[1] is not None}
        plan = {n: t for n, t in plan.items() if t[1] is None}
        placement.targets = {n: t for n, t in placement.targets.items()
                             if not re.search(r"experts\.(gate_proj|up_proj|down_proj)$", n)}
    for name in sorted(plan, key=lambda n: files.weight_map[n]):  # shard by shard
        tensor, _ = files.read(name)
        placement.place(name, tensor, plan[name])
    files.close()
    placement.check_complete(folder)

    model.load_state_dict(placement.loaded, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _materialise_buffers(model, placement.device)
    if offload_experts:
        from minimoe.checkpoints.offload import attach_offloaded_experts

        attach_offloaded_experts(model, files, expert_plan, expert_cache_size, placement.device)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.is_meta]
    if still_meta:
        raise RuntimeError(f"load_pretrained: not loaded: {still_meta[:10]}")
    return model.eval()
