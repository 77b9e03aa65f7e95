"""Weights for parity tests against transformers models (shared by the checkpoint tests)."""

import math

import torch


def randomise(model, seed):
    """Larger random weights than the default init, non-trivial norms, biases and selection bias.

    Default inits (ones for norms, zeros for the selection bias) would let a mis-mapped norm or
    a bias used in the gate weights go unnoticed; fresh random values make every tensor count.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                tensor.copy_(1.0 + 0.2 * noise)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(noise / math.sqrt(tensor.shape[-1]))
    return model
