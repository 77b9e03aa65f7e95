"""Loading published checkpoints: a Hugging Face folder (or hub repo id) -> a minimoe model.

The hub layout
--------------
A model repository on the Hugging Face hub is a folder:

    config.json                          the architecture (``ModelConfig.from_hf`` maps it)
    model.safetensors                    all tensors, when they fit in one file, or
    model-00001-of-000NN.safetensors     shards of at most a few GB each, plus
    model.safetensors.index.json         {"weight_map": {tensor name: shard file name}}

A safetensors file is a JSON header (name -> dtype, shape, byte offsets) followed by the raw
bytes. ``safe_open`` memory-maps it: ``get_tensor(name)`` reads one tensor, and a tensor not
asked for is never read. This loader walks the names one at a time and copies each into its
place in the model, so the largest extra memory at any moment is one checkpoint tensor
(plus its dtype conversion; for an FP8 weight, its float32 dequantisation), never a second
copy of the model.

Tensor names (DeepSeek-V3 / V2; ``{i}`` a layer, ``{e}`` an expert):

    model.embed_tokens.weight                               (V, C)
    model.layers.{i}.input_layernorm.weight                 (C,)
    model.layers.{i}.self_attn.q_a_proj.weight              (q_lora_rank, C)   or q_proj (V2-Lite)
    model.layers.{i}.self_attn.q_a_layernorm.weight
    model.layers.{i}.self_attn.q_b_proj.weight              (H * (nope + rope), q_lora_rank)
    model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight    (kv_lora_rank + rope, C)
    model.layers.{i}.self_attn.kv_a_layernorm.weight
    model.layers.{i}.self_attn.kv_b_proj.weight             (H * (nope + v), kv_lora_rank)
    model.layers.{i}.self_attn.o_proj.weight                (C, H * v)
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight         dense layers (i < first_k_dense_replace)
    model.layers.{i}.mlp.gate.weight                        (E, C) router
    model.layers.{i}.mlp.gate.e_score_correction_bias       (E,) V3 selection bias (float32)
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   one Linear per expert
    model.norm.weight, lm_head.weight

The GQA families (Qwen3-MoE ``qwen3_moe``, Mixtral ``mixtral``, OLMoE ``olmoe``, GLM-4.5
``glm4_moe``) use the Llama attention names instead of the MLA ones:

    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight        q/k/v .bias too for GLM-4.5
    model.layers.{i}.self_attn.{q,k}_norm.weight            QK-norm: (D,) per head (Qwen3,
                                                            GLM-4.5 use_qk_norm) or the full
                                                            width (H*D,), (H_kv*D,) (OLMoE)

and the same mlp.* names as DeepSeek (GLM-4.5 has shared experts and the selection bias;
Qwen3 and OLMoE only gate + experts), except Mixtral, which keeps the original Mistral names:

    model.layers.{i}.block_sparse_moe.gate.weight                 (E, C)   -> mlp.gate.weight
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight       (I, C)   gate_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight       (I, C)   up_proj
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight       (C, I)   down_proj

(transformers 5.x fuses experts in memory, gate_up_proj, but save_pretrained writes these
per-expert hub names back.) All four rotate in the rotate-half layout already: no rows are
permuted. GLM-4.5's MTP layer (model.layers.{num_hidden_layers}) has DeepSeek-V3's layout.

LongCat-Flash (``longcat_flash``; transformers LongcatFlash and the hub checkpoint) keeps the
MLA names, twice per layer, and the DeepSeek expert names; its router has its own name:

    model.layers.{i}.self_attn.{0,1}.<MLA names as above>   two attention sublayers
    model.layers.{i}.mlps.{0,1}.{gate,up,down}_proj.weight  two dense FFNs
    model.layers.{i}.input_layernorm.{0,1}.weight, post_attention_layernorm.{0,1}.weight
    model.layers.{i}.mlp.router.classifier.weight           (E + Z, C) -> mlp.gate.weight
    model.layers.{i}.mlp.router.e_score_correction_bias     (E + Z,)   -> mlp.gate.e_score_...
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   e < E (FFN experts only)
    model.mtp.embed_tokens.weight                           the MTP module's copy of the
                                                            embedding: not read (see below)
    model.mtp.layers.0.enorm.m.weight, hnorm.m.weight       -> mtp.0.enorm / hnorm.weight
    model.mtp.layers.0.eh_proj.weight                       (C, 2C) -> mtp.0.eh_proj.weight
    model.mtp.layers.0.{input,post_attention}_layernorm.weight  -> mtp.0.block.<same>
    model.mtp.layers.0.self_attn.<MLA names as above>       -> mtp.0.block.self_attn.<same>
    model.mtp.layers.0.transformer_layer.mlp.{gate,up,down}_proj.weight
                                                            -> mtp.0.block.mlp.<same> (dense)
    model.mtp.norm.weight                                   -> mtp.0.final_norm.weight

The identity experts hold no weights. transformers 5.23 keeps a fused gate_up_proj with a row
block for *every* expert, identity ones included (never used), so its save_pretrained also
writes mlp.experts.{e}.{gate,up}_proj.weight for E <= e < E + Z: those are skipped. LongCat
rotates MLA's rope dims interleaved, like DeepSeek, so its rope rows are permuted too.

Ling-2.0 (``bailing_moe_v2``; inclusionAI's modeling_bailing_moe_v2.py) uses GQA with its own
names, and the DeepSeek mlp.* names otherwise:

    model.word_embeddings.weight                            -> embed_tokens.weight
    model.layers.{i}.attention.query_key_value.weight       ((H + 2 H_kv) D, C): rows of q,
                                                            then k, then v -> split into
                                                            self_attn.{q,k,v}_proj
    model.layers.{i}.attention.dense.weight                 -> self_attn.o_proj.weight
    model.layers.{i}.attention.{query,key}_layernorm.weight (D,) -> self_attn.{q,k}_norm.weight
    model.layers.{i}.mlp.gate.weight, mlp.gate.expert_bias  -> mlp.gate.weight, mlp.gate.
                                                            e_score_correction_bias
    model.layers.{L + k}.final_layernorm.weight             MTP module k's last norm; its other
                                                            names are DeepSeek-V3's (enorm,
                                                            hnorm, eh_proj, the block)

Ling rotates in the rotate-half layout (the first head_dim * partial_rotary_factor dims of
each head): nothing is permuted.

minimoe keeps the same names without the ``model.`` prefix, except the routed experts: it
stacks them (``minimoe.experts.RoutedExperts``), so ``mlp.experts.{e}.gate_proj.weight``
(I, C) becomes slice ``[e]`` of ``mlp.experts.gate_proj`` (E, I, C). The loader allocates
the stacked tensor once and copies each expert's matrix into its slice.

Multi-token prediction. DeepSeek-V3 stores its MTP module after the main stack, as
``model.layers.{num_hidden_layers + k}``: ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` (minimoe's ``final_norm``), a full decoder layer (``self_attn``,
``mlp``, the two layer norms; minimoe's ``block``), and copies of ``embed_tokens`` and
``shared_head.head`` which are the main model's embedding and output head (minimoe shares
those, so the copies are not read). They load into ``model.mtp[k]``. transformers' own
DeepseekV3 has no MTP module, so the checkpoints it saves carry none although their config
says num_nextn_predict_layers = 1: then the model is built without MTP (with a warning)
rather than with random MTP weights.

LongCat-Flash stores its one MTP module under ``model.mtp.`` instead (names in the table
above): one MLA sublayer and a dense FFN, with the main layers' MLA (latent scales, rope rows
permuted alike). Its config.json does not count it: the loader builds the module exactly
when the checkpoint holds ``model.mtp.*`` tensors (transformers' LongcatFlash has no MTP
module and saves none, so its checkpoints load without MTP, silently). The module's own copy
of the embedding, ``model.mtp.embed_tokens.weight``, is not read: minimoe shares the main
embedding with its MTP modules, as the runtimes that serve LongCat-Flash with MTP drafts
(SGLang, vLLM) do -- they too ignore the copy -- and comparing it with the main embedding
would read a second (V, C) table (1.6 GB in bf16) on every load. With ``layers=`` the
``model.mtp.*`` tensors are skipped like DeepSeek's MTP layer.

FP8 weights. DeepSeek-V3 is published in float8_e4m3fn: every large 2-D ``weight`` has a
float32 companion ``weight_scale_inv`` of shape [ceil(out/128), ceil(in/128)], one scale per
128 x 128 block (``quantization_config.weight_block_size``), and W = fp8 * scale blockwise
(the last row/column of blocks may be partial). The loader dequantises on load, into
``dtype``; ``minimoe.fp8`` is where FP8 compute is taught.

RoPE layout. DeepSeek trained with the *interleaved* rotary layout (pair i = dims 2i, 2i+1,
``minimoe.rope.apply_rotary_interleaved``); minimoe rotates in the rotate-half layout. The
two differ by a fixed permutation of the rotary dims, and a permutation of q's rope dims and
k's rope dims alike leaves every score q . k unchanged, so the loader permutes the output
rows of the weights that produce them, once: the rope rows of every head of ``q_b_proj``
(or ``q_proj``) and the k_pe rows of ``kv_a_proj_with_mqa`` (``permute_rotary_rows``).
When is a checkpoint interleaved? DeepSeek-V2 and V3 weights always are; transformers
(5.x) rotates them interleaved when the config's ``rope_interleave`` is true (DeepseekV3,
default true when the key is absent, as in DeepSeek's own config.json) and always for
DeepseekV2. A deepseek_v3 config with ``rope_interleave: false`` is loaded unpermuted.

What the reader should notice
-----------------------------
* Loading is a *name mapping* plus three transformations: stack experts, permute rope rows,
  dequantise FP8 blocks. Nothing else changes between the published file and the model.
* Every tensor of the file lands somewhere and every parameter of the model comes from the
  file: a missing, unexpected or mis-shaped tensor is an error naming the tensor and file.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Iterable, Optional

import torch

from minimoe.config import ModelConfig
from minimoe.model import Transformer
from minimoe.rope import RotaryEmbedding, permute_rotary_rows

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2",
                         "qwen3_moe", "mixtral", "olmoe", "glm4_moe",
                         "longcat_flash", "bailing_moe_v2")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Mixtral's hub names (the original Mistral release): w1 = gate, w3 = up, w2 = down.
_MIXTRAL_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Read from the MTP layer's copies of shared tensors: nothing (minimoe shares them).
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
            "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "final_norm.weight",
            "final_layernorm.weight": "final_norm.weight"}  # the last: Ling-2.0's name
# LongCat-Flash's MTP module (model.mtp.*): its names without the prefix -> minimoe's under
# mtp.0.; the attention names (layers.0.self_attn.*) pass through to mtp.0.block.self_attn.*.
LONGCAT_MTP_PREFIX = "model.mtp."
_LONGCAT_MTP = {
    "layers.0.enorm.m.weight": "enorm.weight",
    "layers.0.hnorm.m.weight": "hnorm.weight",
    "layers.0.eh_proj.weight": "eh_proj.weight",
    "layers.0.input_layernorm.weight": "block.input_layernorm.weight",
    "layers.0.post_attention_layernorm.weight": "block.post_attention_layernorm.weight",
    "layers.0.transformer_layer.mlp.gate_proj.weight": "block.mlp.gate_proj.weight",
    "layers.0.transformer_layer.mlp.up_proj.weight": "block.mlp.up_proj.weight",
    "layers.0.transformer_layer.mlp.down_proj.weight": "block.mlp.down_proj.weight",
    "norm.weight": "final_norm.weight",
}
_LONGCAT_MTP_SHARED_COPY = "embed_tokens.weight"  # the main embedding's copy: not read
# Names inside a layer (after model.layers.{i}.) of LongCat-Flash and Ling-2.0 -> the names
# above; the fused query_key_value is split in _place.
_LAYER_RENAMES = {
    "mlp.router.classifier.weight": "mlp.gate.weight",  # LongCat-Flash
    "mlp.router.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "mlp.gate.expert_bias": "mlp.gate.e_score_correction_bias",  # Ling-2.0
    "attention.query_key_value.weight": "self_attn.query_key_value.weight",
    "attention.query_key_value.bias": "self_attn.query_key_value.bias",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.query_layernorm.weight": "self_attn.q_norm.weight",
    "attention.key_layernorm.weight": "self_attn.k_norm.weight",
}
_FUSED_QKV = re.compile(r"^(.*self_attn)\.query_key_value\.(weight|bias)$")


# ---------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint_folder(path_or_repo_id: str | os.PathLike,
                              layers: Optional[Iterable[int]] = None) -> str:
    """A local folder as is; a hub repo id is fetched by ``minimoe.hub.download_checkpoint``
    (only the shards that hold ``layers``, when given)."""
    from minimoe.hub import download_checkpoint, looks_like_repo_id

    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if not looks_like_repo_id(path):
        raise FileNotFoundError(f"load_pretrained: {path!r} is not a folder (a local checkpoint "
                                "folder holds config.json and *.safetensors), nor a hub repo id "
                                "of the form 'owner/name'")
    return download_checkpoint(path, layers=layers)


def _read_json(path: str) -> dict:
    """A json object from path; a malformed file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def checkpoint_weight_map(folder: str) -> dict[str, str]:
    """{tensor name: shard file name} from the index json, or from the single file."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object {{tensor name: shard file}}")
        return dict(weight_map)  # shards are checked when opened (a layer subset needs some)
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor "
                                "model.safetensors.index.json")
    with open_shard(folder, "model.safetensors", "every tensor") as handle:
        return {name: "model.safetensors" for name in handle.keys()}


def open_shard(folder: str, file_name: str, tensor_name: str):
    """safe_open a shard; a missing or unreadable file is an error naming it and a tensor."""
    from safetensors import safe_open

    path = os.path.join(folder, file_name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_pretrained: {tensor_name} is in shard {file_name!r} "
                                f"(model.safetensors.index.json), which is not in {folder}")
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # SafetensorError: truncated or corrupt header
        raise ValueError(f"load_pretrained: {path} (holding {tensor_name}) is not a readable "
                         f"safetensors file, truncated or corrupt: {error}") from error


def read_tensor(handle, name: str, file_name: str) -> torch.Tensor:
    """handle.get_tensor(name) with an error naming the tensor and the file."""
    try:
        return handle.get_tensor(name)
    except Exception as error:  # not in the file, or its bytes are cut off
        raise ValueError(f"load_pretrained: cannot read {name} from {file_name} (the index "
                         f"names it there): {type(error).__name__}: {error}") from error


def read_weight(handle_of, name: str, file_name: str, weight_map: dict[str, str],
                block: tuple[int, int], dtype: torch.dtype, scale_fmt: Optional[str] = None,
                caller: str = "load_pretrained") -> tuple[torch.Tensor, int]:
    """Tensor ``name`` of shard ``file_name``, a block-FP8 weight dequantised into ``dtype``.

    handle_of(shard file, tensor name) -> that shard's open ``safe_open`` handle (the scale
    ``name + "_scale_inv"`` may lie in another shard than its weight). A weight with a scale
    comes back as ``dequantize_fp8_blocks``; an FP8 tensor without one is an error naming it.
    Every other tensor is returned as read. Returns (tensor, bytes read from the file).
    caller: the operation named in error messages.
    """
    tensor = read_tensor(handle_of(file_name, name), name, file_name)
    nbytes = tensor.numel() * tensor.element_size()
    scale_name = name + "_scale_inv"
    if scale_name in weight_map:
        scale_file = weight_map[scale_name]
        scale = read_tensor(handle_of(scale_file, scale_name), scale_name, scale_file)
        nbytes += scale.numel() * scale.element_size()
        tensor = dequantize_fp8_blocks(tensor, scale, block, dtype, scale_fmt,
                                       f"{scale_name} (in {scale_file})")
    elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise KeyError(f"{caller}: {name} (in {file_name}) is {tensor.dtype} but the "
                       f"checkpoint has no {scale_name}")
    return tensor, nbytes


def shard_handles(folder: str, file_name: str, handle):
    """``handle_of`` for ``read_weight`` while shard ``file_name`` is open as ``handle``: that
    handle for its own tensors; a scale stored in another shard opens that shard."""
    def handle_of(shard: str, tensor_name: str):
        return handle if shard == file_name else open_shard(folder, shard, tensor_name)
    return handle_of


def check_scale_format(quantization_config: dict, config_path: str,
                       caller: str = "load_pretrained") -> Optional[str]:
    """quantization_config.scale_fmt: None (V3: float32 scales) or "ue8m0" (V3.1); any other
    value is an error naming config_path."""
    scale_fmt = quantization_config.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"{caller}: quantization_config.scale_fmt {scale_fmt!r} in "
                         f"{config_path} is not known; expected none or 'ue8m0'")
    return scale_fmt


# ---------------------------------------------------------------------------------------------
# FP8 blocks and RoPE rows
# ---------------------------------------------------------------------------------------------


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          dtype: torch.dtype, scale_fmt: Optional[str] = None,
                          name: str = "weight_scale_inv") -> torch.Tensor:
    """W = fp8 * scale_inv per (block[0] x block[1]) block; the last blocks may be partial.

    weight (out, in) float8; scale_inv (ceil(out/b0), ceil(in/b1)) float32 (or float8_e8m0fnu)
    -> (out, in) dtype.

    scale_fmt "ue8m0" (DeepSeek-V3.1's quantization_config): every scale is a power of two,
    2^e, the only values an unsigned 8-bit exponent with no mantissa (UE8M0, the scale format
    of the MX formats and of Blackwell's block-scaled FP8 GEMMs) can hold. V3.1 stores them as
    float32 ``weight_scale_inv``, so dequantisation is the same product; the scales are checked
    to really be powers of two (a multiply by 2^e is exact: W is the fp8 value times 2^e, bit
    for bit). name: the scale tensor, for error messages.
    """
    out_features, in_features = weight.shape
    b0, b1 = block
    expected = (math.ceil(out_features / b0), math.ceil(in_features / b1))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(scale_inv.shape)}, expected "
                         f"{expected} for a ({out_features}, {in_features}) weight in "
                         f"{b0}x{b1} blocks")
    if scale_fmt == "ue8m0":
        mantissa, _ = torch.frexp(scale_inv.float())  # x = m * 2^e with m in [0.5, 1)
        if not bool((mantissa == 0.5).all()):
            bad = scale_inv.float()[mantissa != 0.5][0].item()
            raise ValueError(f"{name}: quantization_config.scale_fmt is 'ue8m0' but a scale is "
                             f"{bad!r}, not a positive power of two")
    # one scale row per block row, widened to the columns: (ceil(out/b0), in), not (out, in),
    # so the transient memory is the float32 copy of the weight and the result in dtype
    column_scale = scale_inv.float().repeat_interleave(b1, 1)[:, :in_features]
    result = weight.to(torch.float32)  # (out, in)
    whole_rows = (out_features // b0) * b0
    result[:whole_rows].view(-1, b0, in_features).mul_(column_scale[: out_features // b0, None])
    if whole_rows < out_features:  # the last, partial block row
        result[whole_rows:].mul_(column_scale[-1])
    return result.to(dtype)  # (out, in)


def _rope_is_interleaved(hf: dict) -> bool:
    model_type = hf.get("model_type")
    if model_type == "deepseek_v2":
        return True  # DeepSeek-V2's code (and transformers' DeepseekV2) always is
    if model_type == "longcat_flash":
        return True  # transformers' LongcatFlashMLA: apply_rotary_pos_emb_interleave
    if model_type not in ("deepseek_v3", "kimi_k2"):
        return False  # Qwen3-MoE, Mixtral, OLMoE, GLM-4.5, Ling-2.0: rotate-half
    return bool(hf.get("rope_interleave", True))


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


def _build_config(hf: dict, layers: Optional[list[int]], has_mtp: list[bool]) -> ModelConfig:
    cfg = ModelConfig.from_hf(hf)
    changes: dict = {}
    mtp_depth = cfg.num_nextn_predict_layers
    if cfg.shortcut_moe and any(has_mtp):
        mtp_depth = 1  # LongCat-Flash: one MTP module, whatever config.json says (or not)
    if layers is not None:
        # the MTP modules follow the *last* main layer: they have no meaning for a subset
        mtp_depth = 0
        dense = sum(1 for i in layers if i < cfg.first_k_dense_replace)
        changes.update(num_hidden_layers=len(layers), first_k_dense_replace=dense)
    elif mtp_depth > 0 and not any(has_mtp):
        where = (LONGCAT_MTP_PREFIX + "*" if cfg.shortcut_moe
                 else f"model.layers.{cfg.num_hidden_layers}.*")
        warnings.warn(f"config.json says num_nextn_predict_layers={mtp_depth} but the checkpoint "
                      f"holds no {where} tensors (checkpoints "
                      "saved by transformers carry no MTP module); building the model without "
                      "MTP", stacklevel=3)
        mtp_depth = 0
    changes["num_nextn_predict_layers"] = mtp_depth
    return cfg.replace(**changes)


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
        cache of ``expert_cache_size`` experts (``minimoe.offload``; inference only, naive
        dispatch; counters in ``model.expert_store.stats()``).
    Returns the model in eval mode.
    """
    layers = None if layers is None else list(layers)
    folder = resolve_checkpoint_folder(path_or_repo_id, layers)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"load_pretrained: no config.json in {folder}")
    hf = _read_json(config_path)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"load_pretrained: model_type {model_type!r} in {config_path} "
                                  f"is not supported yet; supported: {SUPPORTED_MODEL_TYPES}")
    weight_map = checkpoint_weight_map(folder)

    # LongCat-Flash's config.json names its layer count num_layers (two sublayers each)
    try:
        num_layers = ModelConfig.from_hf(hf).num_hidden_layers
    except KeyError as error:
        raise KeyError(f"load_pretrained: {config_path} lacks the field {error} that "
                       f"{model_type} configs need") from error
    layer_list = None
    if layers is not None:
        layer_list = sorted(set(int(i) for i in layers))
        if not layer_list or layer_list[0] < 0 or layer_list[-1] >= num_layers:
            raise ValueError(f"layers must be a non-empty set of indices in [0, {num_layers}), "
                             f"got {layer_list}")
    depth = int(hf.get("num_nextn_predict_layers", 0) or 0)
    has_mtp = [any(n.startswith(f"model.layers.{num_layers + k}.") for n in weight_map)
               for k in range(depth)]
    if model_type == "longcat_flash":  # its one MTP module lives under model.mtp.
        has_mtp = [any(n.startswith(LONGCAT_MTP_PREFIX) for n in weight_map)]
    cfg = _build_config(hf, layer_list, has_mtp)
    if offload_experts:
        cfg = cfg.replace(dispatch="naive")  # per-expert calls: what the offloaded store serves

    if dtype is None:
        named = hf.get("torch_dtype", hf.get("dtype"))
        dtype = getattr(torch, named) if isinstance(named, str) and hasattr(torch, named) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
            dtype = torch.float32
    device = torch.device(device)
    quant = hf.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    scale_fmt = check_scale_format(quant, config_path)  # None (V3) or "ue8m0" (V3.1)
    interleaved = _rope_is_interleaved(hf)

    # 1. the module tree without storage: every tensor will come from the file
    with torch.device("meta"):
        model = Transformer(cfg)
    targets = dict(model.state_dict(keep_vars=True))  # minimoe name -> meta tensor
    if cfg.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}  # minimoe name -> real tensor
    filled_experts: dict[str, set] = {}  # stacked minimoe name -> expert indices filled

    # 2. map every checkpoint name to (minimoe name, expert index or None)
    layer_position = {i: j for j, i in enumerate(layer_list)} if layer_list is not None else None
    plan: dict[str, tuple[str, Optional[int]]] = {}
    scales = {n for n in weight_map if n.endswith(".weight_scale_inv")}
    unexpected = []
    for name in weight_map:
        if name in scales or name.endswith("rotary_emb.inv_freq"):
            continue  # scales travel with their weight; inv_freq is recomputed
        target = _map_name(name, num_layers, cfg, layer_position)
        if target == "skip":
            continue
        if target is None:
            unexpected.append(name)
            continue
        plan[name] = target
    if unexpected:
        listing = ", ".join(f"{n} (in {weight_map[n]})" for n in sorted(unexpected)[:10])
        beyond = sorted({int(m.group(1)) for m in map(_LAYER.match, unexpected) if m
                         and int(m.group(1)) >= num_layers})
        hint = (f" (config.json says num_hidden_layers={num_layers} and "
                f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}, but the checkpoint "
                f"has layers {beyond[:5]})" if beyond else "")
        raise KeyError(f"load_pretrained: {len(unexpected)} checkpoint tensor(s) have no place in "
                       f"the minimoe model: {listing}{hint}")
    for scale_name in scales:
        if scale_name[: -len("_scale_inv")] not in weight_map:
            raise KeyError(f"load_pretrained: {scale_name} (in {weight_map[scale_name]}) has no "
                           "matching weight")

    expert_plan: dict[str, tuple[str, int]] = {}  # offloaded: read later, on demand
    if offload_experts:
        expert_plan = {n: t for n, t in plan.items() if t[1] is not None}
        plan = {n: t for n, t in plan.items() if t[1] is None}
        targets = {n: t for n, t in targets.items()
                   if not re.search(r"experts\.(gate_proj|up_proj|down_proj)$", n)}

    # 3. read the shards one tensor at a time
    by_file: dict[str, list[str]] = {}
    for name in plan:
        by_file.setdefault(weight_map[name], []).append(name)
    for file_name in sorted(by_file):
        with open_shard(folder, file_name, by_file[file_name][0]) as handle:
            handle_of = shard_handles(folder, file_name, handle)
            for name in by_file[file_name]:
                tensor, _ = read_weight(handle_of, name, file_name, weight_map, block, dtype,
                                        scale_fmt)
                minimoe_name, expert = plan[name]
                _place(name, file_name, tensor, minimoe_name, expert, targets, loaded,
                       filled_experts, cfg, dtype, device, interleaved)

    # 4. everything the model needs must have come from the file
    missing = []
    for minimoe_name, meta in targets.items():
        if minimoe_name in filled_experts:
            wanted = meta.shape[0]
            if len(filled_experts[minimoe_name]) != wanted:
                absent = sorted(set(range(wanted)) - filled_experts[minimoe_name])
                missing.append(f"{minimoe_name} experts {absent[:8]}")
        elif minimoe_name not in loaded:
            if minimoe_name.endswith("gate.e_score_correction_bias") and not cfg.use_expert_bias:
                loaded[minimoe_name] = torch.zeros(meta.shape, dtype=torch.float32, device=device)
            else:
                missing.append(minimoe_name)
    if missing:
        raise KeyError(f"load_pretrained: {len(missing)} model tensor(s) are not in the checkpoint "
                       f"{folder}: {', '.join(missing[:10])}")

    model.load_state_dict(loaded, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _materialise_buffers(model, device)
    if offload_experts:
        from minimoe.offload import attach_offloaded_experts

        attach_offloaded_experts(model, folder, weight_map, expert_plan, expert_cache_size,
                                 dtype, device, block, scale_fmt)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.is_meta]
    if still_meta:
        raise RuntimeError(f"load_pretrained: not loaded: {still_meta[:10]}")
    return model.eval()


def _map_name(name: str, num_layers: int, cfg: ModelConfig,
              layer_position: Optional[dict[int, int]]):
    """Checkpoint name -> (minimoe name, expert index or None), "skip", or None (no place)."""
    top = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight",
           "model.word_embeddings.weight": "embed_tokens.weight"}  # the last: Ling-2.0
    if name in top:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return None
        return top[name], None
    if cfg.shortcut_moe and name.startswith(LONGCAT_MTP_PREFIX):
        return _map_longcat_mtp_name(name[len(LONGCAT_MTP_PREFIX):], cfg, layer_position)
    match = _LAYER.match(name)
    if match is None:
        return None
    index, rest = int(match.group(1)), match.group(2)
    rest = _LAYER_RENAMES.get(rest, rest)
    if index < num_layers:
        if layer_position is not None:
            if index not in layer_position:
                return "skip"  # a layer left out on purpose (layers=...)
            prefix = f"layers.{layer_position[index]}."
        else:
            prefix = f"layers.{index}."
    else:
        k = index - num_layers
        if layer_position is not None:
            return "skip"  # no MTP with a subset of layers
        if k >= cfg.num_nextn_predict_layers:
            return None
        if rest in _MTP_SHARED_COPIES:
            return "skip"  # the main model's embedding / head, shared in minimoe
        if rest in _MTP_OWN:
            return f"mtp.{k}.{_MTP_OWN[rest]}", None
        prefix = f"mtp.{k}.block."
    mixtral = _MIXTRAL_EXPERT.match(rest)
    if mixtral is not None:
        return f"{prefix}mlp.experts.{_MIXTRAL_PROJ[mixtral.group(2)]}", int(mixtral.group(1))
    if rest == "block_sparse_moe.gate.weight":
        return f"{prefix}mlp.gate.weight", None
    expert = _EXPERT.search(rest)
    if expert is not None:
        if cfg.n_routed_experts <= int(expert.group(1)) < cfg.n_routed_experts + cfg.n_zero_experts:
            return "skip"  # an identity expert's unused rows, written by transformers' LongCat
        return f"{prefix}mlp.experts.{expert.group(2)}", int(expert.group(1))
    return prefix + rest, None


def _map_longcat_mtp_name(rest: str, cfg: ModelConfig,
                          layer_position: Optional[dict[int, int]]):
    """LongCat-Flash's model.mtp.{rest} -> (mtp.0.<name>, None), "skip", or None (no place)."""
    if layer_position is not None:
        return "skip"  # no MTP with a subset of layers
    if rest == _LONGCAT_MTP_SHARED_COPY:
        return "skip"  # the main embedding's copy: minimoe shares it (module docstring)
    if cfg.num_nextn_predict_layers == 0:
        return None
    if rest in _LONGCAT_MTP:
        return f"mtp.0.{_LONGCAT_MTP[rest]}", None
    if rest.startswith("layers.0.self_attn."):
        return "mtp.0.block." + rest[len("layers.0."):], None
    return None


def _place(name, file_name, tensor, minimoe_name, expert, targets, loaded, filled_experts,
           cfg, dtype, device, interleaved) -> None:
    """Check the shape, convert, permute rope rows if needed, store one tensor."""
    fused = _FUSED_QKV.match(minimoe_name)
    if fused is not None:  # Ling-2.0: rows of q (H * D), then k (H_kv * D), then v (H_kv * D)
        sizes = [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"load_pretrained: {name} (in {file_name}) has {tensor.shape[0]} rows; "
                             f"the config's (H + 2 H_kv) * head_dim = {sum(sizes)}")
        for part, rows in zip("qkv", tensor.split(sizes, dim=0)):
            _place(name, file_name, rows, f"{fused.group(1)}.{part}_proj.{fused.group(2)}", None,
                   targets, loaded, filled_experts, cfg, dtype, device, interleaved)
        return
    if minimoe_name not in targets:
        raise KeyError(f"load_pretrained: {name} (in {file_name}) maps to {minimoe_name}, which "
                       "the minimoe model built from config.json does not have")
    meta = targets[minimoe_name]
    wanted = tuple(meta.shape[1:]) if expert is not None else tuple(meta.shape)
    if tuple(tensor.shape) != wanted:
        raise ValueError(f"load_pretrained: {name} (in {file_name}) has shape "
                         f"{tuple(tensor.shape)}; the model built from config.json expects "
                         f"{wanted} for {minimoe_name}{'' if expert is None else f'[{expert}]'}")
    keep_float32 = minimoe_name.endswith("e_score_correction_bias")
    tensor = tensor.to(device=device, dtype=torch.float32 if keep_float32 else dtype)
    if interleaved:
        tensor = _to_rotate_half(minimoe_name, tensor, cfg)
    if expert is None:
        loaded[minimoe_name] = tensor
        return
    if expert >= meta.shape[0]:
        raise ValueError(f"load_pretrained: {name} (in {file_name}): expert {expert} but the "
                         f"config has {meta.shape[0]} routed experts")
    if minimoe_name not in loaded:
        loaded[minimoe_name] = torch.empty(meta.shape, dtype=dtype, device=device)  # (E, ., .)
        filled_experts[minimoe_name] = set()
    loaded[minimoe_name][expert].copy_(tensor)
    filled_experts[minimoe_name].add(expert)


def _to_rotate_half(minimoe_name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Permute the rows that produce q_pe / k_pe from interleaved to rotate-half order."""
    rope, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    minimoe_name = re.sub(r"self_attn\.\d+\.", "self_attn.", minimoe_name)  # LongCat's two
    if minimoe_name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        return permute_rotary_rows(tensor, nope + rope, rope, rotary_offset=nope)
    if minimoe_name.endswith(("self_attn.kv_a_proj_with_mqa.weight",
                              "self_attn.kv_a_proj_with_mqa.bias")):
        return permute_rotary_rows(tensor, cfg.kv_lora_rank + rope, rope,
                                   rotary_offset=cfg.kv_lora_rank)
    return tensor
