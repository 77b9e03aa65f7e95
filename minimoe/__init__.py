"""minimoe: learn how modern Mixture-of-Experts language models work by reading and running them.

    import minimoe
    cfg   = minimoe.ModelConfig.preset("toy")         # or "deepseek-v3", "ling-flash-2.0", ...
    model = minimoe.Transformer(cfg)
    out   = model(input_ids, targets=targets)         # out.logits, out.loss, out.aux
    minimoe.sizing.count_params(cfg)

Each submodule is one concept, opened by a docstring that teaches it: config, sizing, norm,
rope, attention, mla, router, balance, experts, moe, block, mtp, model, generate, speculative,
data, train, viz. Published checkpoints (loading, saving, the hub) live in minimoe.checkpoints.
"""

from minimoe import sizing
from minimoe.config import PRESETS, ModelConfig
from minimoe.checkpoints.export import save_pretrained
from minimoe.checkpoints.load import load_pretrained
from minimoe.model import ModelOutput, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "ModelOutput", "load_pretrained",
           "save_pretrained", "sizing"]
