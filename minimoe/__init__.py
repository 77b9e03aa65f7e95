"""minimoe: learn how modern Mixture-of-Experts language models work by reading and running them."""

from minimoe.config import ModelConfig, PRESETS

__all__ = ["ModelConfig", "PRESETS"]
