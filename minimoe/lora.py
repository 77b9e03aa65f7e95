"""LoRA and QLoRA: fine-tuning a mixture-of-experts model without a datacenter GPU.

Why full fine-tuning does not fit
---------------------------------
Full fine-tuning updates every weight, so besides the weights themselves it keeps a
gradient and two Adam moments for each of them: 16 bytes per parameter in float32 (12 of
them in the optimiser and gradient alone). For DeepSeek-V3's 671B parameters that is
about 10.7 TB. Yet the update a fine-tune makes is small: Aghajanyan et al. (2020) showed
that fine-tuning works inside a subspace of very low dimension.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1)
------------------------------------------------------------------------------------
Freeze the pretrained matrix W (d_out, d_in) and learn its update as a product of two thin
matrices:

    W' = W + (alpha / r) * B A,      A (r, d_in),  B (d_out, r),  r << min(d_in, d_out)
    h  = W x + (alpha / r) * B (A x)          # never form B A while training

* A starts random (the paper: Gaussian; minimoe, like the paper's reference code, uses
  PyTorch's Kaiming-uniform rule for a Linear layer, bound 1/sqrt(d_in)) and B starts at
  zero, so B A = 0: the adapted model is *exactly* the pretrained one at step 0, and the
  first gradient step (which reaches B through A x) starts moving it.
* alpha / r fixes the scale of the update so that changing r does not require retuning
  the learning rate (§4.1: "we simply set alpha to the first r we try").
* Trainable parameters per matrix: r (d_in + d_out) instead of d_in d_out.
* After training, B A is folded into W (``merge_lora``): the merged model has exactly the
  architecture and speed of the original, no adapter at inference.

Which matrices to adapt in an MoE
---------------------------------
Hu et al. adapt the attention projections (§7.1: W_q and W_v already do well). In an MoE
layer there is a second question: which FFN? minimoe's default targets are

* ``"attention"`` -- every projection of the attention sublayer (for MLA: q_a_proj,
  q_b_proj or q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj);
* ``"shared_experts"`` -- the shared experts' gate/up/down projections.

Both see *every* token, so each adapter gets a gradient from every position of every
batch. A routed expert sees only the ~k/E of the tokens routed to it (DeepSeek-V3: 8 of
256), its weights are stacked in (E, I, C) tensors rather than separate Linear layers,
and adapting it would need one adapter per expert -- E times the adapter parameters for
updates that each learn from a small slice of the data. (Other choices exist: ``targets``
also accepts ``"dense_mlp"`` for the dense FFNs of the first layers, and any Linear's own
name such as ``"o_proj"``, ``"lm_head"`` or ``"eh_proj"``.) The router stays frozen: the
fine-tune changes what the always-on paths compute, not which experts tokens go to.
The auxiliary-loss-free expert bias is a buffer updated outside autograd; ``finetune``
never calls ``update_expert_biases``, so it stays frozen too.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3)
-------------------------------------------------------------------------------------
The frozen W is never updated, so it can be stored compressed and dequantised on the fly
in every forward (and, with checkpointing, again in backward); only the small A and B stay
in high precision, and gradients flow *through* the dequantised W to the inputs. minimoe
writes both formats in plain PyTorch, so they run wherever torch runs (bitsandbytes needs
CUDA kernels):

* ``"int8"``: per-output-channel absmax, symmetric. For row o,
  s_o = max_i |W_oi| / 127, q_oi = round(W_oi / s_o) in [-127, 127], W_oi ~ s_o q_oi, so the
  error of every element is at most s_o / 2. 1 byte per weight + 4 bytes per row.
* ``"nf4"``: 4-bit NormalFloat (QLoRA §3, "4-bit NormalFloat Quantization"). The weight is
  flattened and cut into blocks of 64; each block is divided by its absmax (stored in
  float32) and every value is replaced by the index of the nearest of 16 code values.
  The code values are quantiles of N(0, 1), rescaled to [-1, 1]: pretrained weights are
  roughly zero-mean Gaussian, so equal-probability bins waste none of the 16 levels.
  Exactly zero is a code value (padding and zero weights stay exact), which makes the
  code asymmetric: 8 quantiles on the positive side, 7 on the negative. The table
  ``NF4_CODE`` is the one of QLoRA Appendix E (also ``bitsandbytes.functional``):

      -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
       0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0

  built as Phi^-1 of 9 equal steps from delta to 0.5 (positive side) and 8 steps (negative
  side), with delta = 1 - (1/32 + 1/30) / 2, each side scaled so that its end is +-1
  (tests/test_lora.py rebuilds it). Two 4-bit indices are packed into one uint8 (even
  element in the low nibble, odd element in the high nibble): 0.5 byte per weight +
  4 bytes per 64 weights = 4.5 bits per weight. The maximum error of an element is half the
  widest gap between neighbouring code values times its block's absmax (0.1519 * absmax,
  at the gap between -1.0 and -0.6962; the positive side's widest, 0.7230 to 1.0, gives
  0.1385). QLoRA also quantises the absmax constants themselves
  ("double quantisation", 0.127 bits per weight instead of 0.5); minimoe does not.

``quantize_base`` quantises every frozen Linear in the decoder layers (attention, dense
FFNs, shared experts, MTP's eh_proj) and the stacked routed experts -- in an MoE model the
routed experts are nearly all the weights. The embedding, the output head, the norms and
the router stay in float (bitsandbytes also skips the output head by default; routing
decisions are sensitive to small changes of the router logits).

Gradient checkpointing
----------------------
LoRA shrinks the optimiser state but not the activations: backward still needs every
layer's inputs. ``model.gradient_checkpointing = True`` (``--grad-checkpointing``) stores
only each decoder layer's input and recomputes the rest in backward
(``minimoe.block.run_layer``), trading about one extra forward for activation memory.
QLoRA uses it for the same reason. The gradients are the same as without it.

What the reader should notice
-----------------------------
* At step 0 the adapted model's logits equal the base model's exactly (B = 0).
* Only A and B receive gradients; the base weights are bit-identical after training.
* ``lora_parameter_count(cfg)`` computes the trainable fraction from a config alone:
  rank 8 on attention + shared experts of DeepSeek-V3 is 0.009% of its parameters.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimoe.experts import RoutedExperts
from minimoe.train import TrainArgs

DEFAULT_TARGETS = ("attention", "shared_experts")
TARGET_GROUPS = ("attention", "shared_experts", "dense_mlp")
QUANTIZE_KINDS = ("int8", "nf4")
NF4_BLOCK_SIZE = 64
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# QLoRA Appendix E / bitsandbytes.functional: the 16 NormalFloat-4 code values, ascending.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


# ----------------------------------------------------------------------------------------------
# 1. Quantisation of a frozen weight: int8 per output channel, NF4 per block of 64
# ----------------------------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., d_in) -> q int8 (..., d_in), scale float32 (..., 1): W ~ scale * q per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1, keepdim=True) / 127.0  # (..., 1) one scale per output row
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays 0
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)  # (..., d_in)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 (..., d_in), scale (..., 1) -> float32 (..., d_in)."""
    return q.float() * scale


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """n 4-bit values (uint8 in [0, 16), n even) -> n/2 bytes: element 2i low, 2i+1 high nibble."""
    if indices.numel() % 2:
        raise ValueError(f"pack_4bit needs an even number of values, got {indices.numel()}")
    pairs = indices.reshape(-1, 2).to(torch.uint8)  # (n/2, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)  # (n/2,)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_4bit: n/2 bytes -> n uint8 values in [0, 16)."""
    low = packed & 0x0F  # (n/2,)
    high = packed >> 4  # (n/2,)
    return torch.stack([low, high], dim=-1).reshape(-1)  # (n,)


def quantize_nf4(weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Any-shape W -> (packed uint8 (ceil(n/bs)*bs/2,), absmax float32 (ceil(n/bs),)).

    The flattened weight is zero-padded to whole blocks; each block is scaled into [-1, 1]
    by its absmax and every value replaced by the index of its nearest NF4 code value.
    """
    if block_size % 2:
        raise ValueError(f"block_size must be even, got {block_size}")
    flat = weight.detach().float().reshape(-1)  # (n,)
    padding = (-flat.numel()) % block_size
    blocks = F.pad(flat, (0, padding)).view(-1, block_size)  # (n_blocks, bs)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    normalized = blocks / absmax[:, None]  # (n_blocks, bs) in [-1, 1]
    code = NF4_CODE.to(flat.device)  # (16,) ascending
    # nearest code value: the midpoints between neighbours are the decision boundaries
    midpoints = (code[1:] + code[:-1]) / 2  # (15,)
    indices = torch.bucketize(normalized.reshape(-1), midpoints)  # (n_blocks*bs,) in [0, 16)
    return pack_4bit(indices), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: Iterable[int],
                   block_size: int = NF4_BLOCK_SIZE) -> torch.Tensor:
    """(packed, absmax) from quantize_nf4 -> float32 tensor of ``shape``."""
    shape = tuple(shape)
    indices = unpack_4bit(packed).long()  # (n_blocks*bs,)
    values = NF4_CODE.to(packed.device)[indices].view(-1, block_size)  # (n_blocks, bs)
    values = values * absmax[:, None]  # (n_blocks, bs)
    return values.reshape(-1)[: math.prod(shape)].view(shape)


class QuantizedWeight(nn.Module):
    """A frozen weight tensor stored as int8 or NF4 buffers; ``dequantize()`` rebuilds it."""

    def __init__(self, weight: torch.Tensor, kind: str) -> None:
        super().__init__()
        if kind not in QUANTIZE_KINDS:
            raise ValueError(f"quantize_base must be one of {QUANTIZE_KINDS} or None, got {kind!r}")
        self.kind = kind
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype  # what dequantize() returns (the original dtype)
        if kind == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("qweight", q)  # (..., d_in) int8
            self.register_buffer("scale", scale)  # (..., 1) float32
        else:
            packed, absmax = quantize_nf4(weight)
            self.register_buffer("qweight", packed)  # (n/2,) uint8, two codes per byte
            self.register_buffer("scale", absmax)  # (n_blocks,) float32

    def dequantize(self) -> torch.Tensor:
        if self.kind == "int8":
            weight = dequantize_int8(self.qweight, self.scale)
        else:
            weight = dequantize_nf4(self.qweight, self.scale, self.shape)
        return weight.to(self.dtype)

    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scale.nbytes

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, shape={self.shape}"


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored quantised and dequantised in every forward."""

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantized = QuantizedWeight(linear.weight, kind)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised (d_out, d_in) weight (MLA's absorbed mode reads kv_b_proj.weight)."""
        return self.quantized.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)  # (..., d_out)

    def to_linear(self) -> nn.Linear:
        """The float nn.Linear with the dequantised weight."""
        weight = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)


class QuantizedRoutedExperts(RoutedExperts):
    """Frozen ``RoutedExperts`` with quantised stacked weights.

    ``gate_proj``, ``up_proj`` and ``down_proj`` are properties that dequantise the whole
    (E, I, C) / (E, C, I) tensor when the dispatch reads it, so ``minimoe.moe`` runs
    unchanged (one dequantisation per tensor per forward on the sorted path). The float
    tensors are not kept: the plain attributes of the original (sizes, options) are copied.
    """

    def __init__(self, experts: RoutedExperts, kind: str) -> None:
        nn.Module.__init__(self)
        if hasattr(experts, "grouped_swiglu"):  # e.g. minimoe.fp8.Fp8RoutedExperts
            raise ValueError(f"{type(experts).__name__} brings its own expert products; a "
                             f"quantised frozen base would bypass them (use one or the other)")
        for key, value in vars(experts).items():
            if not key.startswith("_") and key not in ("training", *self._WEIGHTS):
                setattr(self, key, value)  # num_experts, hidden_size, intermediate_size, ...
        self.gate_quantized = QuantizedWeight(experts.gate_proj, kind)  # (E, I, C)
        self.up_quantized = QuantizedWeight(experts.up_proj, kind)  # (E, I, C)
        self.down_quantized = QuantizedWeight(experts.down_proj, kind)  # (E, C, I)

    _WEIGHTS = ("gate_proj", "up_proj", "down_proj")

    def reset_parameters(self) -> None:
        raise RuntimeError("quantised routed experts are frozen; merge_lora dequantises them")

    gate_proj = property(lambda self: self.gate_quantized.dequantize())
    up_proj = property(lambda self: self.up_quantized.dequantize())
    down_proj = property(lambda self: self.down_quantized.dequantize())

    def to_routed_experts(self) -> RoutedExperts:
        gate = self.gate_proj
        experts = RoutedExperts(self.num_experts, self.hidden_size, self.intermediate_size)
        experts = experts.to(device=gate.device, dtype=gate.dtype)
        for key, value in vars(self).items():
            if not key.startswith("_") and key != "training":
                setattr(experts, key, value)  # sizes and options (init_std, ...)
        with torch.no_grad():
            experts.gate_proj.copy_(gate)
            experts.up_proj.copy_(self.up_proj)
            experts.down_proj.copy_(self.down_proj)
        return experts.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# 2. The adapter
# ----------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B (A dropout(x)); base frozen (float or quantised).

    Parameters: lora_A (r, d_in), lora_B (d_out, r); both float32 whatever the base dtype.
    ``weight`` is the effective (d_out, d_in) matrix W + (alpha/r) B A, differentiable in
    A and B, for code that reads a Linear's weight directly (MLA's absorbed mode).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank,
                                               device=device))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's rule: U(+-1/sqrt(d_in))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        base = self.base.weight
        delta = self.scaling * (self.lora_B @ self.lora_A)  # (d_out, d_in)
        return (base.float() + delta).to(base.dtype)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, (d_out, d_in) float32."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., d_out) frozen path
        low = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        update = F.linear(low, self.lora_B) * self.scaling  # (..., d_out)
        return out + update.to(out.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha/r) B A (float32 sum, then the base dtype)."""
        with torch.no_grad():
            base_weight = self.base.weight
            weight = (base_weight.float() + self.delta_weight()).to(base_weight.dtype)
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha}")


# ----------------------------------------------------------------------------------------------
# 3. Choosing the targets, wrapping, freezing
# ----------------------------------------------------------------------------------------------
def target_group(name: str) -> str:
    """The group of a Linear named ``name`` in a Transformer: attention, shared_experts,
    dense_mlp, or otherwise its own last name component (lm_head, eh_proj)."""
    parts = name.split(".")
    if "self_attn" in parts:
        return "attention"
    if "shared_experts" in parts:
        return "shared_experts"
    if len(parts) >= 2 and parts[-2] == "mlp" or "mlps" in parts:
        return "dense_mlp"
    return parts[-1]


def _is_selected(name: str, targets: Iterable[str]) -> bool:
    return target_group(name) in targets or name.split(".")[-1] in targets


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16,
             targets: Iterable[str] = DEFAULT_TARGETS, dropout: float = 0.0,
             quantize_base: Optional[str] = None) -> nn.Module:
    """Wrap the target nn.Linear modules in LoRALinear and freeze everything else (in place).

    targets: group names ("attention", "shared_experts", "dense_mlp") and/or Linear names
    ("o_proj", "lm_head", ...). quantize_base: None, "int8" or "nf4" -- also stores the
    other frozen decoder Linears and the routed experts quantised (module docstring).
    Returns the model.
    """
    targets = tuple(targets)
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty list of names, got {targets!r}")
    if quantize_base is not None and quantize_base not in QUANTIZE_KINDS:
        raise ValueError(f"quantize_base must be one of {QUANTIZE_KINDS} or None, "
                         f"got {quantize_base!r}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora it first")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    chosen = [name for name in linears if _is_selected(name, targets)]
    for target in targets:  # a group may be empty (toy-dense has no shared experts)
        if target not in TARGET_GROUPS and not any(_is_selected(n, (target,)) for n in linears):
            names = sorted({name.split(".")[-1] for name in linears})
            raise ValueError(f"LoRA target {target!r} is neither a group {TARGET_GROUPS} nor "
                             f"the name of an nn.Linear in the model ({names})")
    if not chosen:
        raise ValueError(f"LoRA targets {targets} match no nn.Linear in the model")

    model.requires_grad_(False)
    for name in chosen:
        base = linears[name]
        if quantize_base is not None:
            base = QuantizedLinear(base, quantize_base)
        _set_submodule(model, name, LoRALinear(base, rank, alpha, dropout))
    if quantize_base is not None:
        quantize_frozen_base(model, quantize_base)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets),
                         "dropout": dropout, "quantize_base": quantize_base}
    return model


def quantize_frozen_base(model: nn.Module, kind: str) -> None:
    """Quantise the decoder's frozen Linears (not lm_head) and stacked routed experts."""
    for name, module in list(model.named_modules()):
        in_decoder = name.startswith("layers.") or name.startswith("mtp.")
        if not in_decoder or ".base" in name:
            continue
        if type(module) is nn.Linear:
            _set_submodule(model, name, QuantizedLinear(module, kind))
        elif isinstance(module, RoutedExperts):
            _set_submodule(model, name, QuantizedRoutedExperts(module, kind))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"layers.0.self_attn.q_a_proj.lora_A": (r, d_in), ...}: the adapters only."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A"] = module.lora_A.detach()
        state[f"{name}.lora_B"] = module.lora_B.detach()
    return state


def save_lora(model: nn.Module, path: str) -> None:
    """Write the folder ``path``: adapter_model.safetensors + adapter_config.json."""
    from safetensors.torch import save_file

    if not lora_modules(model):
        raise ValueError("the model has no LoRA adapters to save (call add_lora first)")
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS))
    config = dict(getattr(model, "lora_config", {}))
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as handle:
        json.dump(config, handle, indent=2)


def load_lora(model: nn.Module, path: str, quantize_base: Optional[str] = None) -> nn.Module:
    """Load adapters saved by save_lora; adds them first (rank/alpha/targets from the json)
    when the model has none. Every adapter tensor must match by name and shape."""
    from safetensors.torch import load_file

    config_path, weights_path = (os.path.join(path, ADAPTER_CONFIG),
                                 os.path.join(path, ADAPTER_WEIGHTS))
    for needed in (config_path, weights_path):
        if not os.path.exists(needed):
            raise FileNotFoundError(f"LoRA adapter file missing: {needed}")
    with open(config_path) as handle:
        config = json.load(handle)
    for field in ("rank", "alpha", "targets"):
        if field not in config:
            raise KeyError(f"{config_path} lacks the field {field!r} (written by save_lora)")
    if not lora_modules(model):
        add_lora(model, rank=config["rank"], alpha=config["alpha"], targets=config["targets"],
                 dropout=config.get("dropout", 0.0), quantize_base=quantize_base)
    for name, module in lora_modules(model).items():  # adapters the model had already
        for field in ("rank", "alpha"):  # alpha / rank scales B A: a mismatch changes the model
            if getattr(module, field) != config[field]:
                raise ValueError(f"{config_path} says {field}={config[field]!r}, but the "
                                 f"model's adapter {name} has {field}={getattr(module, field)!r}")
    saved = load_file(weights_path)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model's adapters: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    for name, module in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            tensor, parameter = saved[f"{name}.{part}"], getattr(module, part)
            if tensor.shape != parameter.shape:
                raise ValueError(f"{weights_path}: {name}.{part} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(parameter.shape)}")
            with torch.no_grad():
                parameter.copy_(tensor)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, dequantise quantised bases, remove the
    wrappers: the result is an ordinary float Transformer (parameters left frozen)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_submodule(model, name, module.merged_linear())
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            _set_submodule(model, name, module.to_linear())
        elif isinstance(module, QuantizedRoutedExperts):
            _set_submodule(model, name, module.to_routed_experts())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ----------------------------------------------------------------------------------------------
# 4. Counting: trainable fraction from a config, weight memory of a built model
# ----------------------------------------------------------------------------------------------
def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """Every nn.Linear a Transformer(cfg) builds: {module name: (d_in, d_out)}.

    The model is built on the meta device: modules and parameter shapes, no memory and no
    initialisation, so this works for DeepSeek-V3's 671B parameters in milliseconds and can
    never drift from the real module tree."""
    from minimoe.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: (module.in_features, module.out_features)
            for name, module in model.named_modules() if type(module) is nn.Linear}


def lora_parameter_count(cfg, rank: int = 8, targets: Iterable[str] = DEFAULT_TARGETS) -> dict:
    """{"trainable", "total", "fraction", "adapted_linears"} for add_lora(Transformer(cfg)),
    from the config alone (r (d_in + d_out) per adapted Linear; total from minimoe.sizing)."""
    from minimoe.sizing import count_params

    targets = tuple(targets)
    chosen = {n: s for n, s in linear_shapes(cfg).items() if _is_selected(n, targets)}
    trainable = sum(rank * (d_in + d_out) for d_in, d_out in chosen.values())
    total = count_params(cfg)["total"] + trainable
    return {"trainable": trainable, "total": total, "fraction": trainable / total,
            "adapted_linears": len(chosen)}


def weight_bytes(model: nn.Module) -> dict:
    """Bytes the model's weights occupy: {"total", "quantized", "lora"} (parameters and
    buffers, shared tensors once; "quantized" = the int8/NF4 buffers and their scales)."""
    seen, total, quantized, lora = set(), 0, 0, 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.nbytes
        if ".quantized." in f".{name}" or "_quantized." in name:
            quantized += tensor.nbytes
        if name.endswith("lora_A") or name.endswith("lora_B"):
            lora += tensor.nbytes
    return {"total": total, "quantized": quantized, "lora": lora}


# ----------------------------------------------------------------------------------------------
# 5. The fine-tuning loop (``minimoe finetune``)
# ----------------------------------------------------------------------------------------------
@dataclass
class FinetuneArgs(TrainArgs):
    """TrainArgs (data, steps, lr schedule, batching, device, checkpointing) plus LoRA's own."""

    model: str = "toy"  # a preset name, a minimoe checkpoint folder or a published checkpoint
    lora_rank: int = 8
    lora_alpha: float = 16.0
    targets: tuple = DEFAULT_TARGETS
    lora_dropout: float = 0.0
    quantize_base: Optional[str] = None
    merge: bool = False  # also write the merged model to out_dir/merged
    out_dir: Optional[str] = None  # None: runs/<model>-lora-<data file stem>
    steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50


def load_base_model(source: str, config_overrides: Optional[dict] = None, seed: int = 0):
    """A preset name (random weights, for trying the pipeline), a checkpoint folder written
    by ``minimoe train`` (config.json is a ModelConfig), or a published checkpoint folder
    or hub id (``minimoe.load_pretrained``). config_overrides: ModelConfig fields of a preset
    (an error with a checkpoint, where they would not apply)."""
    from minimoe.checkpoints.load import load_pretrained
    from minimoe.config import PRESETS, ModelConfig
    from minimoe.model import Transformer
    from minimoe.train import load_checkpoint

    from minimoe.run_folder import recover_if_interrupted

    recover_if_interrupted(source)  # a run folder a kill left inside a save
    if config_overrides and source not in PRESETS:
        raise ValueError(f"config overrides {sorted(config_overrides)} change a preset's fields; "
                         f"{source!r} is a checkpoint, whose config.json fixes its fields")
    config_path = os.path.join(source, "config.json")
    if os.path.isdir(source) and os.path.exists(config_path):
        with open(config_path) as handle:
            is_hf = "model_type" in json.load(handle)
        return load_pretrained(source) if is_hf else load_checkpoint(source)
    if source in PRESETS:
        torch.manual_seed(seed)
        return Transformer(ModelConfig.preset(source, **(config_overrides or {})))
    if os.path.exists(source):
        raise FileNotFoundError(f"{source!r} is neither a preset nor a checkpoint folder "
                                "with a config.json")
    return load_pretrained(source)


def finetune(args, model: Optional[nn.Module] = None,
             on_step: Optional[Callable[[dict], None]] = None):
    """LoRA fine-tuning; returns (model, history). Writes the adapters to args.out_dir and,
    with args.merge, the merged model (a ``minimoe train`` run folder) to out_dir/merged.

    The optimiser step is train.training_step, the one ``minimoe train`` takes; what LoRA
    leaves out: AdamW over the adapters only, no expert-bias update (the base, buffers
    included, stays frozen).
    """
    from minimoe import data as data_lib
    from minimoe.train import (evaluate, learning_rate, pick_device, progress_bar,
                               save_checkpoint, training_corpora, training_step)

    _check_finetune_args(args)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train_corpus, val_corpus = training_corpora(args)

    if model is None:
        model = load_base_model(args.model, args.config_overrides, args.seed)
    model = model.to(device)
    add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.targets,
             dropout=args.lora_dropout, quantize_base=args.quantize_base)
    # what load_finetuned needs to rebuild the base (a preset's random init: seed and --set)
    model.lora_config.update(base_model=_base_reference(args.model), base_seed=args.seed,
                             base_overrides=dict(args.config_overrides))
    model.gradient_checkpointing = args.grad_checkpointing
    parameters = trainable_parameters(model)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)

    generator = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16")
    history = []
    progress = progress_bar(args.steps, 0, "finetune", args.progress)
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        step_started = time.perf_counter()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals, grad_norm, _ = training_step(model, optimizer, parameters, train_corpus,
                                             generator, args, device, autocast)
        record = {"step": step + 1, "lr": lr, "loss": totals["loss"], "ce": totals["ce"],
                  "grad_norm": grad_norm,
                  "tokens_per_second": args.batch_size * args.seq_len * args.grad_accum
                  / (time.perf_counter() - step_started)}
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record["val_loss"] = evaluate(model, val_corpus, args, device)
        history.append(record)
        if on_step is not None:
            on_step(record)
        if progress is not None:
            progress.set_postfix({"loss": f"{record['ce']:.3f}"}, refresh=False)
            progress.update(1)
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            break
    if progress is not None:
        progress.close()

    if args.save:
        save_lora(model, args.out_dir)
        _save_tokenizer_beside(model, args.out_dir)
    if args.merge:
        merge_lora(model)
        if args.save:
            save_checkpoint(os.path.join(args.out_dir, "merged"), model, None, len(history),
                            args, history)
    return model, history


def _check_finetune_args(args) -> None:
    """The flags, the data size and the output folder, before the base model is loaded."""
    from minimoe.train import _check_data, _check_numbers

    _check_numbers(args)
    _check_data(args)
    for flag, value in (("--lora-rank", args.lora_rank), ("--lora-alpha", args.lora_alpha)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value!r}")
    if args.out_dir is None:
        base = os.path.basename(os.path.normpath(args.model)) or "model"
        data = os.path.splitext(os.path.basename(args.data))[0] if args.data else "synthetic"
        args.out_dir = os.path.join("runs", f"{base}-lora-{data}")
    holds = os.path.exists(os.path.join(args.out_dir, ADAPTER_WEIGHTS))
    if args.save and holds and not args.overwrite:
        raise FileExistsError(f"--out {args.out_dir!r} already holds LoRA adapters: "
                              "--overwrite replaces them, or choose another --out")


def _base_reference(source: str) -> str:
    """How adapter_config.json names the base: a preset as is, a local folder as an
    absolute path (so the adapters load from anywhere), a hub id as is."""
    return os.path.abspath(source) if os.path.isdir(source) else source


def _save_tokenizer_beside(model: nn.Module, folder: str) -> None:
    """A byte-level model's adapters carry byte_tokenizer.json (generate/chat read it)."""
    from minimoe.checkpoints.tokenizer import BYTE_TOKENIZER_FILE, byte_tokenizer_json

    if model.cfg.vocab_size == 256:
        with open(os.path.join(folder, BYTE_TOKENIZER_FILE), "w") as handle:
            handle.write(byte_tokenizer_json())


def load_finetuned(folder: str, quantize_base: Optional[str] = None) -> nn.Module:
    """The base model adapter_config.json names, with the adapters of ``folder`` added
    (what ``minimoe generate`` / ``chat`` run for a ``minimoe finetune`` output folder)."""
    with open(os.path.join(folder, ADAPTER_CONFIG)) as handle:
        config = json.load(handle)
    base = config.get("base_model")
    if base is None:
        raise ValueError(f"{os.path.join(folder, ADAPTER_CONFIG)} does not name its base model "
                         "(written by an older minimoe): load the base yourself and call "
                         "minimoe.lora.load_lora(model, folder), or use the merged model "
                         "(minimoe finetune --merge writes FOLDER/merged)")
    model = load_base_model(base, config.get("base_overrides"), config.get("base_seed", 0))
    return load_lora(model, folder, quantize_base=quantize_base).eval()
