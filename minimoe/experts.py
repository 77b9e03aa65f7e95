"""Experts: the SwiGLU feed-forward network, alone (dense / shared) and stacked (routed).

The idea
--------
An "expert" in a modern MoE language model is nothing exotic: it is the same gated
feed-forward network (FFN) that a dense transformer block uses, only narrower. What makes
a layer a *mixture* is that there are many of them and a router sends each token to a few
(see ``minimoe.router`` and ``minimoe.moe``). This file defines the network itself, twice:

* ``SwiGLU`` -- one FFN made of three ``nn.Linear`` layers. It serves as the dense FFN of
  the first ``first_k_dense_replace`` layers and as the *shared* experts of an MoE layer.
* ``RoutedExperts`` -- E FFNs of the same shape whose weights are stacked into three
  tensors with a leading expert axis. ``expert_forward(e, x)`` runs expert ``e`` on its
  tokens, exactly as ``SwiGLU`` would; ``minimoe.moe`` runs all of them at once.

The formula (SwiGLU, Shazeer 2020, "GLU Variants Improve Transformer")
--------------------------------------------------------------------------
For a token x (C,), with gate and up matrices W_g, W_u (I, C) and down matrix W_d (C, I):

    FFN(x) = W_d ( silu(W_g x)  *  (W_u x) ),        silu(z) = z * sigmoid(z)

``*`` is elementwise. The gate branch decides, per hidden unit, how much of the up branch
passes through. Three matrices instead of two cost 1.5x the parameters at equal width, so
Llama-style models shrink I to about 8/3 C to keep the budget of a ReLU FFN of width 4C.
No biases anywhere (DeepSeek, Llama, Qwen, Ling, LongCat all drop them). The weight names
``gate_proj``, ``up_proj``, ``down_proj`` are those of the Hugging Face checkpoints.

Fine-grained and shared experts (DeepSeekMoE, Dai et al. 2024, §3)
------------------------------------------------------------------
DeepSeekMoE keeps the compute of a classic top-2-of-16 MoE but splits every expert into m
narrower ones (width I/m) and routes each token to m times as many (top-2m of 16m). The
number of *combinations* of experts a token can use explodes (C(64, 8) vs C(16, 2)), so
each expert can specialise more finely. On top, K_s *shared* experts see every token
and absorb the common knowledge that every routed expert would otherwise have to repeat:

    h = x + sum_{i<K_s} FFN_i^shared(x) + sum_{i<E} g_i(x) FFN_i^routed(x)

In DeepSeek-V3: C = 7168, E = 256 routed experts of width I = 2048, top-8, one shared
expert. The shared experts of one layer are *one* SwiGLU of width K_s * I (concatenating
the hidden units of K_s FFNs is the same function as summing K_s FFNs), which is how the
checkpoints store them (``mlp.shared_experts.gate_proj`` is (K_s * I, C)).

Why stack the routed experts
----------------------------
A list of E ``SwiGLU`` modules (as the Hugging Face ``DeepseekV3MoE`` does) invites a
Python loop over experts. Stacked tensors

    gate_proj (E, I, C)      up_proj (E, I, C)      down_proj (E, C, I)

keep each expert's matrix in the ``nn.Linear`` layout (out_features, in_features), so
``gate_proj[e]`` is exactly the ``weight`` of expert e's Linear layer and loading a
checkpoint is a ``torch.stack`` -- but they also let a grouped matrix multiply read all
experts' weights from one tensor (``minimoe.moe.dispatch_sorted``). ``expert_forward``
below is the readable one-expert version that the naive dispatch and the tests use.

Initialisation
--------------
Routed-expert weights start as N(0, init_std^2) with init_std = 0.02 by default, the same
rule ``minimoe.model.Transformer`` applies to every matrix (``cfg.initializer_range``;
it re-initialises these tensors itself, so the default matters only for a stand-alone
layer). ``SwiGLU`` keeps PyTorch's ``nn.Linear`` default until the model re-initialises it.

What the reader should notice
-----------------------------
* ``expert_forward(e, x)`` and ``SwiGLU`` compute the same function: copy expert e's
  three matrices into a ``SwiGLU`` and the outputs agree (the tests check this).
* Only the *selection* of experts is sparse; each expert itself is a dense little FFN.
  All the engineering of an MoE layer is in feeding each expert its tokens quickly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """One gated FFN: down(silu(gate(x)) * up(x)). Dense FFN and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)  # W_g (I, C)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)  # W_u (I, C)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)  # W_d (C, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C)."""
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., I)
        return self.down_proj(hidden)  # (..., C)


class RoutedExperts(nn.Module):
    """E SwiGLU experts with their weights stacked along a leading expert axis.

    Parameters (``nn.Linear`` layout per expert: (out_features, in_features)):
        gate_proj (E, I, C), up_proj (E, I, C), down_proj (E, C, I)
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if num_experts < 1 or hidden_size < 1 or intermediate_size < 1:
            raise ValueError(
                f"RoutedExperts needs num_experts, hidden_size, intermediate_size >= 1, got "
                f"{num_experts}, {hidden_size}, {intermediate_size}"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        E, C, I = num_experts, hidden_size, intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, C))  # (E, I, C)
        self.up_proj = nn.Parameter(torch.empty(E, I, C))  # (E, I, C)
        self.down_proj = nn.Parameter(torch.empty(E, C, I))  # (E, C, I)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(weight, mean=0.0, std=self.init_std)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` alone on its tokens: x (n, C) -> (n, C). The readable version.

        (``minimoe.fp8.Fp8RoutedExperts`` overrides it, and adds ``grouped_swiglu``, to run the
        same three products in FP8.)"""
        gate = x @ self.gate_proj[e].T  # (n, C) @ (C, I) -> (n, I)
        up = x @ self.up_proj[e].T  # (n, I)
        hidden = F.silu(gate) * up  # (n, I)
        return hidden @ self.down_proj[e].T  # (n, I) @ (I, C) -> (n, C)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}")
