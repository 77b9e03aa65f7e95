"""Every checkpoint family minimoe reads and writes, by config.json ``model_type``.

A tenth family is one module defining a ``minimoe.checkpoints.family.Family`` and one line in
``FAMILIES`` below; loading, saving, ``ModelConfig.from_hf`` and hub downloads follow it.
"""

from __future__ import annotations

from minimoe.checkpoints.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from minimoe.checkpoints.family import Family, check_field_types
from minimoe.checkpoints.gqa import GLM4_MOE, MIXTRAL, OLMOE, QWEN3_MOE
from minimoe.checkpoints.ling import LING_2
from minimoe.checkpoints.longcat import LONGCAT_FLASH

# In the order save_pretrained tries them when no family is named: the first whose config.json
# can express the model's config is written.
FAMILIES: tuple[Family, ...] = (DEEPSEEK_V3, DEEPSEEK_V2, LONGCAT_FLASH, QWEN3_MOE, MIXTRAL,
                                OLMOE, GLM4_MOE, LING_2)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)


class UnsupportedModelType(NotImplementedError, ValueError):
    """A config.json whose model_type no family reads (a ValueError of the config, too)."""


def family_of(model_type, where: str = "config.json") -> Family:
    """The family that reads ``model_type``; an unknown one is an error naming ``where``."""
    if model_type not in BY_MODEL_TYPE:
        raise UnsupportedModelType(f"model_type {model_type!r} in {where} is not supported yet; "
                                  f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return BY_MODEL_TYPE[model_type]


def config_values(hf: dict, where: str = "config.json") -> dict:
    """The ModelConfig fields a config.json means (``ModelConfig.from_hf`` builds them).

    A config without model_type is read as DeepSeek-V3's (the layout minimoe's names follow).
    Field types are checked first, so a wrong one is named before any arithmetic uses it.
    """
    model_type = hf.get("model_type", "deepseek_v3")
    family = family_of(model_type, where)
    check_field_types(hf, where)
    try:
        return family.config_from_hf(hf, model_type)
    except KeyError as error:
        raise KeyError(f"{where} lacks the field {error} that {model_type} configs need") from None


def infer_model_type(cfg) -> str:
    """The model_type to save cfg as: the one it was loaded from (``ModelConfig.from_hf`` names
    a config after its model_type when the config.json has no _name_or_path) if that family can
    still express it, else the first (in ``FAMILIES`` order) whose config.json can."""
    reasons = []
    first = [BY_MODEL_TYPE[cfg.name]] if cfg.name in BY_MODEL_TYPE else []
    for family in first + list(FAMILIES):
        model_type = family.model_types[0]
        try:
            family.config_to_hf(cfg, model_type)
            return model_type
        except ValueError as error:
            reasons.append(str(error))
    raise ValueError("save_pretrained: no checkpoint family can express this ModelConfig:\n  "
                     + "\n  ".join(reasons))
