"""Weights for parity tests against transformers models (shared by the checkpoint tests)."""

import math
import os

import torch
from safetensors import safe_open

# Logits parity bound for the tiny random float32 checkpoints (logits of magnitude ~4, std ~1)
# against transformers or an independent forward. Measured: <= 4.1e-6 over every family test
# (float32 rounding in a different order; MTP draft logits included); 2e-5 leaves a 5x
# margin. A real mismatch crosses it by far: RMSNorm eps 1e-5 instead of the checkpoint's
# 1e-6 moves DeepSeek-V3's logits by 1.5e-3
# (test_checkpoint.py::test_the_parity_bound_catches_a_wrong_norm_eps).
PARITY_ATOL = 2e-5


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


def save_randomised(model, folder, seed):
    """``randomise`` a transformers model (float32, eval) and save it as a sharded hub checkpoint.

    40 KB shards make even a tiny model several shards plus an index, as published models are.
    """
    model = randomise(model.float().eval(), seed)
    model.save_pretrained(folder, max_shard_size="40KB")
    return model


def read_all(folder):
    """Every tensor of every *.safetensors file in folder: {name: tensor}."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
    return tensors


def deepseek_mtp_tensors(tensors, config, block_layer, seed):
    """An MTP layer in DeepSeek-V3's published layout, ``model.layers.{num_hidden_layers}.*``.

    Its block copies the shapes (not the values) of main layer ``block_layer``, with fresh
    random values scaled as ``randomise`` scales them (norm gains near one, unit-scale
    outputs); enorm, hnorm, eh_proj and shared_head.norm are random too, and the layer's
    copies of the embedding and the head equal the main ones, as published.
    """
    n, C = config["num_hidden_layers"], config["hidden_size"]
    generator = torch.Generator().manual_seed(seed)

    def fresh(name, shape):
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            return 1.0 + 0.2 * noise
        return 0.1 * noise if name.endswith("e_score_correction_bias") else noise / math.sqrt(shape[-1])

    source = f"model.layers.{block_layer}."
    mtp = {f"model.layers.{n}." + name[len(source):]: fresh(name, tensor.shape)
           for name, tensor in tensors.items() if name.startswith(source)}
    for own, shape in (("enorm.weight", (C,)), ("hnorm.weight", (C,)),
                       ("eh_proj.weight", (C, 2 * C)), ("shared_head.norm.weight", (C,))):
        mtp[f"model.layers.{n}.{own}"] = fresh(own, shape)
    mtp[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    return mtp
