"""What a checkpoint family is: one table that maps names both ways, and the rules beside it.

The idea
--------
A published checkpoint is data plus a naming convention (``minimoe.checkpoints`` gives the
layout). What differs between DeepSeek-V3, Qwen3-MoE, Mixtral, OLMoE, GLM-4.5, LongCat-Flash
and Ling-2.0 is small and always of the same four kinds, so a family is four things:

1. a **config mapping**, both ways: ``config_from_hf(hf)`` gives the ModelConfig fields a
   config.json means (``ModelConfig.from_hf`` calls it), ``config_to_hf(cfg)`` writes the
   config.json that maps back to ``cfg`` (``save_pretrained``), refusing a field the family
   cannot express;
2. a **name table** (``NameTable``): hub tensor name <-> minimoe parameter name. ONE table per
   family, read by ``to_minimoe`` when loading and by ``to_hub`` when saving, so the two
   directions cannot drift apart (torchtitan's state-dict adapters are built the same way);
3. a **RoPE-layout rule**: does the checkpoint rotate its rope dims interleaved (DeepSeek,
   LongCat) or rotate-half (minimoe's own layout, and the GQA families')? Interleaved rows are
   permuted once on load and back on save (``rope_rows``);
4. its **MTP names** (``MtpNames``): where the multi-token-prediction modules live.

Every name inside a decoder layer that a family spells like DeepSeek-V3 needs no entry; the
table lists only the differences. Loading a name is:

    model.layers.{i}.{rest}          ->  layers.{i}.{layer[rest] or rest}
    model.layers.{i}.{experts}.{e}.{proj}.weight  ->  layers.{i}.mlp.experts.{proj}  slice [e]
    <top-level name>                 ->  top[name]
    <MTP module k's names>           ->  mtp.{k}.{...}        (``MtpNames``)

and saving runs the same table backwards.

What the reader should notice
-----------------------------
* A tenth family is one module with one ``Family``: its config mapping, its table, its rope
  rule, its MTP names -- and it loads and saves.
* Nothing here builds a model or reads a file; ``minimoe.checkpoints.load`` and ``export`` do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from minimoe.rope import permute_rotary_rows

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SKIP = "skip"  # to_minimoe's answer for a tensor that is read by nothing, on purpose
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MtpNames:
    """Where a family stores its MTP modules (DeepSeek-V3 §2.2; ``minimoe.mtp``).

    prefix: the hub prefix of module k: "model.layers.{index}." with index =
        num_hidden_layers + k (DeepSeek-V3, GLM-4.5, Ling-2.0: after the main stack), or a
        fixed prefix (LongCat-Flash: "model.mtp.", one module).
    own: {hub name after the prefix: minimoe name after "mtp.{k}."} for the module's own
        tensors (enorm, hnorm, eh_proj, the final norm, ...).
    shared_copies: {hub name after the prefix: main-model minimoe name} for the copies of the
        embedding / output head that the checkpoint stores with the module. minimoe shares
        the main model's tensors, so the copies are not read; saving writes them.
    block: the hub prefix (after the module prefix) of the module's decoder block; what
        follows it maps like a main layer's names, under "mtp.{k}.block.".
    """

    prefix: str = "model.layers.{index}."
    own: dict = field(default_factory=lambda: {
        "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "final_norm.weight"})
    shared_copies: dict = field(default_factory=lambda: {
        "embed_tokens.weight": "embed_tokens.weight",
        "shared_head.head.weight": "lm_head.weight"})
    block: str = ""

    def module_prefix(self, k: int, num_layers: int) -> str:
        return self.prefix.format(index=num_layers + k)


@dataclass(frozen=True)
class NameTable:
    """Hub name <-> minimoe name for one family (see the module docstring).

    top: {hub name: minimoe name} outside the decoder layers.
    layer: {hub name: minimoe name} inside ``model.layers.{i}.`` where they differ.
    experts: the hub prefix, inside a layer, of the per-expert tensors
        ``{experts}.{e}.{projection}.weight``; projections: {minimoe projection: hub name}.
    fused: {minimoe name inside a layer: (its parts)}: one hub tensor holds the parts' rows
        stacked (Ling-2.0's query_key_value = q rows, then k, then v); the loader splits it,
        the exporter concatenates.
    mtp: the MTP modules' names.
    """

    top: dict = field(default_factory=lambda: {
        "model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"})
    layer: dict = field(default_factory=dict)
    experts: str = "mlp.experts"
    projections: dict = field(default_factory=lambda: {p: p for p in PROJECTIONS})
    fused: dict = field(default_factory=dict)
    mtp: MtpNames = field(default_factory=MtpNames)

    def layer_to_hub(self) -> dict:
        return {minimoe: hub for hub, minimoe in self.layer.items()}


@dataclass(frozen=True)
class Family:
    """One checkpoint family: config mapping, name table, RoPE rule (module docstring)."""

    model_types: tuple  # the config.json model_type values it reads; the first is written
    architectures: dict  # model_type -> the transformers class name written on export
    config_from_hf: Callable[[dict, str], dict]  # (config.json, model_type) -> ModelConfig fields
    config_to_hf: Callable[[Any, str], dict]  # (ModelConfig, model_type) -> config.json
    rope_interleaved: Callable[[dict], bool] = lambda hf: False
    names: NameTable = field(default_factory=NameTable)


# ----------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """What the name mapping needs to know of the model: sizes, MTP depth, a layer subset.

    layer_position: None = every layer; {checkpoint layer index: minimoe layer index} for a
    subset (``load_pretrained(layers=...)``): other layers and the MTP modules are skipped.
    """

    num_layers: int
    mtp_depth: int
    n_routed_experts: int = 0
    n_zero_experts: int = 0
    tie_word_embeddings: bool = False
    layer_position: Optional[dict] = None

    @classmethod
    def of(cls, cfg, layer_position: Optional[dict] = None, num_layers: Optional[int] = None):
        return cls(num_layers if num_layers is not None else cfg.num_hidden_layers,
                   cfg.num_nextn_predict_layers, cfg.n_routed_experts, cfg.n_zero_experts,
                   cfg.tie_word_embeddings, layer_position)


# ------------------------------------------------------------------- loading: hub -> minimoe
def to_minimoe(table: NameTable, name: str, layout: Layout):
    """A hub tensor name -> (minimoe name, expert index or None), SKIP, or None (no place)."""
    if name in table.top:
        if table.top[name] == "lm_head.weight" and layout.tie_word_embeddings:
            return None  # a tied model has no head of its own
        return table.top[name], None
    mtp = table.mtp
    if "{index}" not in mtp.prefix and name.startswith(mtp.prefix):  # LongCat: model.mtp.
        return _mtp_to_minimoe(table, name[len(mtp.prefix):], 0, layout)
    match = _LAYER.match(name)
    if match is None:
        return None
    index, rest = int(match.group(1)), match.group(2)
    if index >= layout.num_layers:
        if "{index}" not in mtp.prefix:
            return None
        return _mtp_to_minimoe(table, rest, index - layout.num_layers, layout)
    if layout.layer_position is not None:
        if index not in layout.layer_position:
            return SKIP  # a layer left out on purpose (layers=...)
        index = layout.layer_position[index]
    return _layer_to_minimoe(table, rest, f"layers.{index}.", layout)


def _mtp_to_minimoe(table: NameTable, rest: str, k: int, layout: Layout):
    mtp = table.mtp
    if layout.layer_position is not None:
        return SKIP  # the MTP modules follow the last main layer: none with a subset
    if rest in mtp.shared_copies:
        return SKIP  # the main model's embedding / head: shared in minimoe
    if k >= layout.mtp_depth:
        return None
    if rest in mtp.own:
        return f"mtp.{k}.{mtp.own[rest]}", None
    if rest.startswith(mtp.block):
        return _layer_to_minimoe(table, rest[len(mtp.block):], f"mtp.{k}.block.", layout)
    return None


def _layer_to_minimoe(table: NameTable, rest: str, prefix: str, layout: Layout):
    expert = re.match(rf"^{re.escape(table.experts)}\.(\d+)\.(\w+)\.weight$", rest)
    hub_to_projection = {hub: p for p, hub in table.projections.items()}
    if expert is not None and expert.group(2) in hub_to_projection:
        e = int(expert.group(1))
        if layout.n_routed_experts <= e < layout.n_routed_experts + layout.n_zero_experts:
            return SKIP  # an identity expert's unused rows (transformers' LongCat writes them)
        return f"{prefix}mlp.experts.{hub_to_projection[expert.group(2)]}", e
    return prefix + table.layer.get(rest, rest), None


# -------------------------------------------------------------------- saving: minimoe -> hub
def to_hub(table: NameTable, name: str, layout: Layout) -> str:
    """A minimoe parameter name -> its hub name (stacked experts: see ``expert_to_hub``)."""
    for hub, minimoe in table.top.items():
        if minimoe == name:
            return hub
    if name.startswith("layers."):
        index, rest = name[len("layers."):].split(".", 1)
        return f"model.layers.{index}." + table.layer_to_hub().get(rest, rest)
    if name.startswith("mtp."):
        k, rest = name[len("mtp."):].split(".", 1)
        mtp = table.mtp
        prefix = mtp.module_prefix(int(k), layout.num_layers)
        own = {minimoe: hub for hub, minimoe in mtp.own.items()}
        if rest in own:
            return prefix + own[rest]
        if rest.startswith("block."):
            inner = rest[len("block."):]
            return prefix + mtp.block + table.layer_to_hub().get(inner, inner)
    raise KeyError(f"save_pretrained: the minimoe tensor {name} has no hub name in this "
                   f"family's table")


def expert_to_hub(table: NameTable, hub_stacked: str, expert: int) -> str:
    """The hub name of one expert's slice: hub_stacked is to_hub of ``...mlp.experts.{proj}``."""
    prefix, projection = hub_stacked.rsplit("mlp.experts.", 1)
    return f"{prefix}{table.experts}.{expert}.{table.projections[projection]}.weight"


# ------------------------------------------------------------------------------- RoPE rows
def rope_rows(minimoe_name: str, cfg) -> Optional[tuple[int, int]]:
    """(head size, rotary offset) of the rows that produce q_pe / k_pe in an MLA weight, or
    None when ``minimoe_name`` has no rope rows.

    The interleaved and rotate-half layouts differ by a fixed permutation of the rotary dims;
    permuting q's rope dims and k's alike leaves every score q . k unchanged, so converting a
    checkpoint permutes the output rows of the weights that produce them, once
    (``permute_rotary_rows``).
    """
    name = re.sub(r"self_attn\.\d+\.", "self_attn.", minimoe_name)  # LongCat's two sublayers
    rope, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        return nope + rope, nope
    if name.endswith(("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias")):
        return cfg.kv_lora_rank + rope, cfg.kv_lora_rank
    return None


def to_rotate_half(minimoe_name: str, tensor: torch.Tensor, cfg) -> torch.Tensor:
    """Loading: interleaved rope rows -> minimoe's rotate-half rows."""
    rows = rope_rows(minimoe_name, cfg)
    if rows is None:
        return tensor
    return permute_rotary_rows(tensor, rows[0], cfg.qk_rope_head_dim, rotary_offset=rows[1])


def to_interleaved(minimoe_name: str, tensor: torch.Tensor, cfg) -> torch.Tensor:
    """Saving: the inverse permutation of ``to_rotate_half``."""
    rows = rope_rows(minimoe_name, cfg)
    if rows is None:
        return tensor
    forward = permute_rotary_rows(torch.arange(tensor.shape[0]), rows[0], cfg.qk_rope_head_dim,
                                  rotary_offset=rows[1])
    return tensor[torch.argsort(forward)]  # loaded = saved[forward], so saved = loaded[inverse]


# ------------------------------------------------------------------- config.json, checked
INTEGER_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
    "ffn_hidden_size", "expert_ffn_hidden_size", "n_routed_experts", "num_experts",
    "num_local_experts", "num_experts_per_tok", "moe_topk", "n_shared_experts",
    "num_shared_experts", "zero_expert_num", "n_group", "topk_group", "first_k_dense_replace",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "max_position_embeddings", "num_nextn_predict_layers", "decoder_sparse_step", "rotary_dim",
    "moe_shared_expert_intermediate_size")
NUMBER_FIELDS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "partial_rotary_factor",
                 "router_aux_loss_coef", "aux_loss_alpha")
BOOLEAN_FIELDS = ("tie_word_embeddings", "norm_topk_prob", "attention_bias", "use_qk_norm",
                  "use_qkv_bias", "use_bias", "mla_scale_q_lora", "mla_scale_kv_lora",
                  "moe_router_enable_expert_bias", "rope_interleave", "seq_aux")


def check_field_types(hf: dict, source: str = "config.json") -> None:
    """A config.json field of the wrong JSON type is an error naming the file and the field.

    ``"hidden_size": "32"`` or ``"n_routed_experts": true`` would otherwise fail later inside
    arithmetic, or (True == 1) silently build a different model. None (JSON null) is allowed:
    the families treat it as "absent".
    """
    def refuse(key: str, wanted: str) -> None:
        value = hf[key]
        raise ValueError(f"{source}: field {key!r} is {value!r} (a JSON "
                         f"{_json_type(value)}); expected {wanted}")

    for key in INTEGER_FIELDS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            refuse(key, "an integer")
    for key in NUMBER_FIELDS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            refuse(key, "a number")
    for key in BOOLEAN_FIELDS:
        value = hf.get(key)
        if value is not None and not isinstance(value, bool):
            refuse(key, "true or false")


def _json_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def rejecter(hf: dict, model_type: str):
    """config_from_hf's check: reject(key, why) raises ValueError naming the config key whose
    value would make the checkpoint compute what minimoe does not."""
    def reject(key: str, why: str) -> None:
        raise ValueError(f"from_hf({model_type}): {key}={hf.get(key)!r} {why}; minimoe does not "
                         "implement it, so the model would compute a different function")
    return reject


def need(cfg, family: str, condition: bool, field_name: str, wanted: str) -> None:
    """config_to_hf's check: the family's config.json cannot say what cfg.<field> says."""
    if not condition:
        raise ValueError(f"save_pretrained(family={family!r}): ModelConfig.{field_name}="
                         f"{getattr(cfg, field_name)!r}, but a {family} checkpoint needs {wanted}")


def rope_parameters(cfg) -> dict:
    """transformers 5's rope_parameters for cfg (rope_theta and the scaling keys in one dict)."""
    parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        parameters.update(rope_type=kind, **scaling)
    return parameters


def read_rope(hf: dict, default_theta: float) -> tuple[float, Optional[dict], dict]:
    """(rope_theta, rope_scaling or None, the rest of rope_parameters) from a config.json.

    transformers >= 5 writes rope_parameters = {"rope_type", "rope_theta", scaling keys...};
    older configs (and the publishers' own) rope_theta + rope_scaling at the top level.
    """
    parameters = dict(hf.get("rope_parameters") or {})
    theta = parameters.pop("rope_theta", hf.get("rope_theta", default_theta))
    extra = {key: parameters.pop(key) for key in ("partial_rotary_factor",) if key in parameters}
    scaling = parameters or hf.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return theta, (None if kind in (None, "default") else scaling), extra
