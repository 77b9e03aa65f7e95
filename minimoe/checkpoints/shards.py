"""Reading and writing sharded safetensors folders, one tensor at a time.

The idea
--------
A checkpoint folder is ``config.json``, the tensors in ``model.safetensors`` (when they fit in
one file) or in shards ``model-0000k-of-0000N.safetensors`` plus
``model.safetensors.index.json`` = {"weight_map": {tensor name: shard file name}}. A safetensors
file is a JSON header (name -> dtype, shape, byte offsets) followed by the raw bytes;
``safe_open`` memory-maps it, so ``get_tensor(name)`` reads one tensor and a tensor not asked
for is never read. Everything in ``minimoe.checkpoints`` reads through ``CheckpointFiles``,
which carries what every reader needs -- the folder, the weight map, the FP8 block size and
scale format, the dtype to produce -- and keeps each shard open once.

FP8 blocks (DeepSeek-V3 §3.3; its config.json's quantization_config). DeepSeek-V3 is published
in float8_e4m3fn: every large 2-D ``weight`` has a float32 companion ``weight_scale_inv`` of
shape [ceil(out/128), ceil(in/128)], one scale per 128 x 128 block
(``weight_block_size``), and

    W[r, c] = fp8[r, c] * scale_inv[r // 128, c // 128]      (the last blocks may be partial)

V3.1 writes ``scale_fmt: "ue8m0"``: every scale is a power of two (``dequantize_fp8_blocks``).
``minimoe.fp8`` is where FP8 compute is taught; here the weights are only dequantised.

Every tensor read is checked to be finite: a shard whose bytes are corrupted in place (same
size, so the header still parses) typically decodes to NaN or inf somewhere, and a model
loaded from it would print garbage without a word. The check (``all_finite``) is one
reduction per tensor; ``python -m minimoe.bench.checkpoint_load`` times loading a 1.8 GB
checkpoint with and without it: on a 2-core CPU the difference was within the run-to-run
noise (about 3 s either way, from the page cache).

What the reader should notice
-----------------------------
* The index is the table of contents: a layer subset or one expert is read without touching
  the rest of a 700 GB checkpoint.
* This module knows nothing about models or families: it is the layer everything else in
  ``minimoe.checkpoints`` stands on, and it imports nothing above it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json(path: str) -> dict:
    """A json object from path; a malformed file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def weight_map_of(folder: str) -> dict[str, str]:
    """{tensor name: shard file name} from the index json, or from the single file."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object {{tensor name: shard file}}")
        return dict(weight_map)  # shards are checked when opened (a layer subset needs some)
    if not os.path.exists(os.path.join(folder, SINGLE_FILE)):
        raise FileNotFoundError(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    with open_shard(folder, SINGLE_FILE, "every tensor") as handle:
        return {name: SINGLE_FILE for name in handle.keys()}


def open_shard(folder: str, file_name: str, tensor_name: str, caller: str = "load_pretrained"):
    """safe_open a shard; a missing or unreadable file is an error naming it and a tensor."""
    from safetensors import safe_open

    path = os.path.join(folder, file_name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{caller}: {tensor_name} is in shard {file_name!r} "
                                f"({INDEX_FILE}), which is not in {folder}")
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # SafetensorError: truncated or corrupt header
        raise ValueError(f"{caller}: {path} (holding {tensor_name}) is not a readable "
                         f"safetensors file, truncated or corrupt: {error}") from error


def check_scale_format(quantization_config: dict, config_path: str,
                       caller: str = "load_pretrained") -> Optional[str]:
    """quantization_config.scale_fmt: None (V3: float32 scales) or "ue8m0" (V3.1); any other
    value is an error naming config_path."""
    scale_fmt = quantization_config.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"{caller}: quantization_config.scale_fmt {scale_fmt!r} in "
                         f"{config_path} is not known; expected none or 'ue8m0'")
    return scale_fmt


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


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no inf in tensor, in one fast pass.

    A sum is NaN or inf whenever an element is (NaN propagates, inf - inf = NaN), so a finite
    float32 (float64) sum proves every element finite. A sum can also overflow with finite
    elements only; that rare case is settled element by element. The single reduction runs
    ~30x faster than ``torch.isfinite(tensor).all()`` on this project's CPUs, which builds a
    boolean tensor as large as the input.
    """
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


@dataclass
class CheckpointFiles:
    """One checkpoint folder, as every reader sees it.

    folder, weight_map ({tensor name: shard file}), block (the FP8 block size), scale_fmt
    (None or "ue8m0"), dtype (what FP8 weights are dequantised into), caller (the operation
    named in error messages). Shards are opened once and kept open (memory maps: the bytes
    are read only when a tensor is asked for).
    """

    folder: str
    weight_map: dict
    block: tuple = (128, 128)
    scale_fmt: Optional[str] = None
    dtype: torch.dtype = torch.float32
    caller: str = "load_pretrained"
    handles: dict = field(default_factory=dict, repr=False)  # shard file -> safe_open handle

    @classmethod
    def open(cls, folder: str, dtype: torch.dtype = torch.float32,
             caller: str = "load_pretrained", config: Optional[dict] = None,
             weight_map: Optional[dict] = None) -> "CheckpointFiles":
        """The folder's weight map and quantization_config (read from the folder unless the
        caller has them already)."""
        config_path = os.path.join(folder, "config.json")
        if config is None:
            config = read_json(config_path)
        quant = config.get("quantization_config") or {}
        return cls(folder, weight_map if weight_map is not None else weight_map_of(folder),
                   tuple(quant.get("weight_block_size", (128, 128))),
                   check_scale_format(quant, config_path, caller), dtype, caller)

    def handle(self, file_name: str, tensor_name: str):
        if file_name not in self.handles:
            self.handles[file_name] = open_shard(self.folder, file_name, tensor_name, self.caller)
        return self.handles[file_name]

    def read_raw(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored, with an error naming the tensor and its file."""
        file_name = self.weight_map[name]
        handle = self.handle(file_name, name)  # a missing shard: an error naming it
        try:
            return handle.get_tensor(name)
        except Exception as error:  # not in the file, or its bytes are cut off
            raise ValueError(f"{self.caller}: cannot read {name} from {file_name} (the index "
                             f"names it there): {type(error).__name__}: {error}") from error

    def read(self, name: str) -> tuple[torch.Tensor, int]:
        """Tensor ``name``, a block-FP8 weight dequantised into ``dtype``; (tensor, bytes read).

        A weight with a ``name + "_scale_inv"`` (the scale may lie in another shard) comes back
        dequantised; an FP8 tensor without one is an error naming it. Every other tensor is
        returned as stored. A floating tensor holding NaN or inf is an error naming it and its
        file (corrupted bytes decode to those).
        """
        tensor = self.read_raw(name)
        nbytes = tensor.numel() * tensor.element_size()
        scale_name = name + "_scale_inv"
        if scale_name in self.weight_map:
            scale = self.read_raw(scale_name)
            nbytes += scale.numel() * scale.element_size()
            tensor = dequantize_fp8_blocks(tensor, scale, self.block, self.dtype, self.scale_fmt,
                                           f"{scale_name} (in {self.weight_map[scale_name]})")
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise KeyError(f"{self.caller}: {name} (in {self.weight_map[name]}) is {tensor.dtype} "
                           f"but the checkpoint has no {scale_name}")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"{self.caller}: {name} (in {self.weight_map[name]}) holds NaN or "
                             "inf values: the file is corrupted (re-download it)")
        return tensor, nbytes

    def shape(self, name: str) -> tuple:
        """A tensor's shape from its shard's header, without reading its bytes."""
        file_name = self.weight_map[name]
        return tuple(self.handle(file_name, name).get_slice(name).get_shape())

    def close(self) -> None:
        self.handles.clear()


# ------------------------------------------------------------------------------- writing
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


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: str, max_bytes: int,
                 metadata: Optional[dict] = None) -> dict[str, str]:
    """Write (name, tensor) pairs into shards of at most max_bytes (a larger single tensor gets
    a shard of its own); returns {name: file}. Only the current shard is held in memory.

    Shards are written under temporary names and renamed once all are complete, so a crash
    midway leaves no half-written ``model-*.safetensors`` beside an older index.
    """
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    temporary: list[str] = []

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
        file_name = SINGLE_FILE if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        os.replace(path, os.path.join(folder, file_name))
        weight_map.update({name: file_name for name in names})
    return weight_map


def write_index(folder: str, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, INDEX_FILE), "w") as handle:
        json.dump(index, handle, indent=2)
