"""The whole model: a pre-norm decoder-only transformer whose FFNs are mixtures of experts.

The idea
--------
Every model minimoe teaches -- DeepSeek-V3, Ling-2.0, Qwen3-MoE, Mixtral, OLMoE -- has the
same skeleton (GPT-2's pre-norm variant, Radford et al. 2019; Llama's RMSNorm + SwiGLU +
RoPE, Touvron et al. 2023):

    h_0     = Emb(t)                                     # (B, T, C)
    u_l     = h_{l-1} + Attention_l(RMSNorm(h_{l-1}))    # MHA, GQA or MLA
    h_l     = u_l + FFN_l(RMSNorm(u_l))                  # dense SwiGLU or MoE
    logits  = Head(RMSNorm(h_L))                         # (B, T, V)

What makes it a *DeepSeek-V3-style* MoE model is what fills the boxes:

* FFN_l is a dense SwiGLU for the first ``first_k_dense_replace`` layers (V3: 3 of 61;
  early layers see nearly raw token embeddings and routing them is not worth it) and an
  MoE layer (``minimoe.moe.MoE``: router, shared experts, fine-grained routed experts)
  everywhere else;
* Attention_l is MLA (``minimoe.mla``) or MHA/GQA (``minimoe.attention``);
* after the main stack, D multi-token-prediction modules (``minimoe.mtp``, V3 §2.2) each
  predict one token further ahead, sharing the embedding and output head.

The training loss (DeepSeek-V3 §2.2 and §2.1.2):

    L = CE(main)  +  (lambda / D) * sum_k CE(MTP_k)  +  sum over MoE layers of
        (alpha_aux * L_aux + alpha_seq * L_seq + alpha_z * L_z)

with each balance term already multiplied by its coefficient inside the MoE layer (only
those with a non-zero coefficient are present). The auxiliary-loss-free balancing of V3 is
*not* a loss: after each optimiser step the trainer calls ``model.update_expert_biases()``.

What the reader should notice: the MoE changes nothing in the skeleton. A token's path is
a residual stream; the router only decides which small FFNs write into it at each layer.

The blocks themselves live in ``minimoe.block`` (``DecoderLayer``; LongCat-Flash's
``ShortcutDecoderLayer``, ``cfg.shortcut_moe``, whose MoE branch starts mid-layer), the MTP
modules and their loss in ``minimoe.mtp``.

Names follow the transformers DeepseekV3 modules (``embed_tokens``, ``layers.{i}``, ``norm``,
``lm_head``) so that published checkpoints map onto this module tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimoe import fp8
from minimoe.block import DecoderLayer, ShortcutDecoderLayer, merge_moe_aux, run_layer
from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.experts import RoutedExperts
from minimoe.kernel_switch import follows_config_kernels
from minimoe.moe import MoE
from minimoe.mtp import MTPModule, mtp_losses
from minimoe.norm import RMSNorm
from minimoe.traceable import check


@dataclass
class ModelOutput:
    """What ``Transformer.forward`` returns.

    logits: (B, T, V) next-token logits of the main model.
    loss:   scalar total training loss when targets were given, else None.
    aux:    {"router": {layer name: router statistics}, "losses": {name: scalar tensor}}.
            losses holds "ce" (main cross-entropy), "mtp" (the weighted MTP term), and the
            summed balance terms "aux", "seq_aux", "z" that are switched on.
    hidden: (B, T, C) final hidden state before the last norm (MTP and decoding use it).
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux: dict = field(default_factory=dict)
    hidden: Optional[torch.Tensor] = None


class Transformer(nn.Module):
    """A DeepSeek-V3-style MoE language model (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kernels = cfg.kernels  # the kernel switch: "reference" | "triton" (minimoe.kernel_switch)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layer_class = ShortcutDecoderLayer if cfg.shortcut_moe else DecoderLayer
        self.layers = nn.ModuleList(layer_class(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, depth=k + 1) for k in range(cfg.num_nextn_predict_layers)
        )
        self.gradient_checkpointing = False
        # lambda of the MTP loss; a plain attribute so a trainer can schedule it (V3: 0.3 then 0.1)
        self.mtp_loss_weight = cfg.mtp_loss_weight
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.fp8:  # FP8 GEMMs in the experts and attention projections (DeepSeek-V3 §3.3)
            fp8.convert_to_fp8(self)

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) for every matrix, zeros for biases, ones for norms."""
        std = self.cfg.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RoutedExperts):
            for weight in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(weight, mean=0.0, std=std)

    # ---- forward -------------------------------------------------------------------------------
    @follows_config_kernels
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> ModelOutput:
        """input_ids (B, T) long; targets (B, T) long (input shifted by one; -100 = ignore)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal input_ids shape {(B, T)}"
            )
        check((input_ids.max() < self.cfg.vocab_size) & (input_ids.min() >= 0),
              f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size})")
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + T} exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        positions = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        if cache is not None and self.cfg.shortcut_moe:
            # two attention sublayers per LongCat layer: two cache slots each (a cache made
            # with one slot per layer, as minimoe.generate makes it, gets the rest here)
            cache.layers.extend({} for _ in range(2 * len(self.layers) - len(cache.layers)))

        router_stats: dict = {}
        losses: dict = {}
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.layers:
            x, moe_aux = run_layer(layer, x, positions, cache, self.gradient_checkpointing)
            merge_moe_aux(f"layers.{layer.layer_index}", moe_aux, router_stats, losses)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.norm(x))  # (B, T, V)

        loss = None
        if targets is not None:
            ce = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T),
                                 ignore_index=-100)
            losses["ce"] = ce
            loss = ce
            if len(self.mtp) > 0 and T > len(self.mtp):
                mtp_ce = mtp_losses(self, x, input_ids, targets, positions, router_stats, losses)
                weight = self.mtp_loss_weight / len(self.mtp)
                losses["mtp"] = weight * sum(mtp_ce)
                for k, value in enumerate(mtp_ce):
                    losses[f"mtp_ce_{k + 1}"] = value.detach()
                loss = loss + losses["mtp"]
            for name in ("aux", "seq_aux", "z"):
                if name in losses:
                    loss = loss + losses[name]
        return ModelOutput(logits=logits, loss=loss,
                           aux={"router": router_stats, "losses": losses}, hidden=x)

    # ---- training helpers -------------------------------------------------------------------
    @torch.no_grad()
    def update_expert_biases(self) -> None:
        """Aux-loss-free balancing: nudge every MoE layer's selection bias (call after a step)."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.update_expert_bias()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, compile: bool = False,
                 **kwargs) -> torch.Tensor:
        """Autoregressive sampling; see ``minimoe.generate.generate`` for the options.

        compile=True decodes over a pre-allocated cache with a decode step compiled once by
        torch.compile (``minimoe.static_cache``; the first call pays the compilation)."""
        if compile:
            if kwargs.pop("use_cache", True) is False:
                raise ValueError("compile=True decodes with a (pre-allocated) cache: use_cache "
                                 "must be True")
            from minimoe.static_cache import generate_static

            return generate_static(self, input_ids, max_new_tokens, **kwargs)
        from minimoe.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
