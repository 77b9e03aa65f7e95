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

LongCat-Flash changes the block itself (``ShortcutDecoderLayer``, ``cfg.shortcut_moe``): two
attention sublayers and two dense FFNs per layer, and one MoE fed from the middle of the
layer whose output joins at its end, so its communication can overlap the second half.

Names follow the transformers DeepseekV3 modules (``embed_tokens``, ``layers.{i}.self_attn``,
``layers.{i}.mlp.gate``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``,
``lm_head``) so that published checkpoints map onto this module tree; the LongCat block
follows transformers' LongcatFlashDecoderLayer (``self_attn.{0,1}``, ``mlps.{0,1}``,
``input_layernorm.{0,1}``, ``post_attention_layernorm.{0,1}``, ``mlp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minimoe.attention import Attention
from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.experts import RoutedExperts, SwiGLU
from minimoe.kernel_switch import follows_config_kernels
from minimoe.mla import MultiHeadLatentAttention
from minimoe.moe import MoE
from minimoe.norm import RMSNorm


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


class DecoderLayer(nn.Module):
    """One pre-norm block: x + Attn(norm(x)), then + FFN(norm(.)); FFN dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.kernels = cfg.kernels  # "reference" | "triton", set around forward (and its recompute)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.attention == "mla":
            self.self_attn = MultiHeadLatentAttention(cfg, layer_index)
        else:
            self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # In a shortcut_moe model (LongCat-Flash) this plain block only serves as the MTP
        # module's block, which is one MLA sublayer and one *dense* FFN (model.mtp.* in the
        # LongCat checkpoint); its main layers are ShortcutDecoderLayer.
        self.is_moe = cfg.is_moe_layer(layer_index) and not cfg.shortcut_moe
        if self.is_moe:
            self.mlp = MoE(cfg)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    @follows_config_kernels
    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None
    ) -> tuple[torch.Tensor, Optional[dict]]:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)  # (B, T, C)
        if self.is_moe:
            ffn_out, moe_aux = self.mlp(self.post_attention_layernorm(x))  # (B, T, C)
        else:
            ffn_out, moe_aux = self.mlp(self.post_attention_layernorm(x)), None
        return x + ffn_out, moe_aux  # (B, T, C)


class ShortcutDecoderLayer(nn.Module):
    """LongCat-Flash's shortcut-connected MoE block (ScMoE; LongCat-Flash technical report
    arXiv:2509.01322, §2, "Shortcut-connected MoE"; transformers LongcatFlashDecoderLayer).

    One layer holds two pre-norm sublayer pairs (attention + dense SwiGLU each) and one MoE.
    The MoE reads the normalised hidden state after the *first* attention sublayer and its
    output is added only at the *end* of the layer:

        u   = x + MLA_0(norm_in_0(x))                 # (B, T, C) first attention sublayer
        h   = norm_post_0(u)                          # (B, T, C) shared by FFN_0 and the MoE
        m   = MoE(h)                                  # (B, T, C) the shortcut branch
        v   = u + FFN_0(h)                            # (B, T, C) first dense FFN
        w   = v + MLA_1(norm_in_1(v))                 # (B, T, C) second attention sublayer
        out = w + FFN_1(norm_post_1(w)) + m           # (B, T, C) second FFN, then the shortcut

    Why: in a plain MoE block the expert all-to-all (dispatch and combine across devices)
    sits between attention and the next layer, and nothing can run while it is in flight.
    Here nothing in (FFN_0, MLA_1, FFN_1) depends on m, so the MoE's communication overlaps
    that dense compute. Per token the layer costs two attention and two dense FFN passes
    plus the experts the router picks; with zero-computation experts (``cfg.n_zero_experts``,
    ``minimoe.moe``) that is between 0 and k FFN experts.

    The two attention sublayers are separate KV-cache slots: 2 * layer_index and
    2 * layer_index + 1 (transformers numbers them the same way).
    Submodule names follow transformers: self_attn.{0,1}, mlps.{0,1}, input_layernorm.{0,1},
    post_attention_layernorm.{0,1}, mlp (the MoE; its router is ``mlp.gate`` in minimoe,
    ``mlp.router.classifier`` in the checkpoints).
    """

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        if cfg.attention != "mla":
            raise ValueError(f"ModelConfig({cfg.name}): shortcut_moe is LongCat-Flash's block, "
                             f"built with attention='mla', got {cfg.attention!r}")
        self.layer_index = layer_index
        self.kernels = cfg.kernels
        C = cfg.hidden_size
        self.self_attn = nn.ModuleList(
            MultiHeadLatentAttention(cfg, 2 * layer_index + i) for i in range(2))
        self.mlps = nn.ModuleList(SwiGLU(C, cfg.intermediate_size) for _ in range(2))
        self.input_layernorm = nn.ModuleList(RMSNorm(C, cfg.rms_norm_eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(
            RMSNorm(C, cfg.rms_norm_eps) for _ in range(2))
        self.is_moe = cfg.is_moe_layer(layer_index)
        self.mlp = MoE(cfg) if self.is_moe else None  # no shortcut branch in a dense layer

    @follows_config_kernels
    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None
    ) -> tuple[torch.Tensor, Optional[dict]]:
        u = x + self.self_attn[0](self.input_layernorm[0](x), positions, cache)  # (B, T, C)
        h = self.post_attention_layernorm[0](u)  # (B, T, C)
        shortcut, moe_aux = self.mlp(h) if self.is_moe else (None, None)  # (B, T, C)
        v = u + self.mlps[0](h)  # (B, T, C)
        w = v + self.self_attn[1](self.input_layernorm[1](v), positions, cache)  # (B, T, C)
        out = w + self.mlps[1](self.post_attention_layernorm[1](w))  # (B, T, C)
        if shortcut is not None:
            out = out + shortcut  # (B, T, C) the MoE joins at the end of the layer
        return out, moe_aux


def run_layer(layer: DecoderLayer, x, positions, cache, use_checkpoint: bool):
    """Run one layer, optionally with activation checkpointing (recompute in backward).

    Checkpointing trades compute for memory: the layer's inner activations are dropped after
    the forward pass and recomputed during backward. The non-reentrant variant preserves the
    RNG state, so noisy gating draws the same noise twice. The MoE's token counter for the
    bias update is incremented again during recomputation; the bias update uses only the
    sign of (mean load - load), which a uniform factor of 2 does not change.
    """
    if use_checkpoint and torch.is_grad_enabled() and cache is None:
        return checkpoint(layer, x, positions, None, use_reentrant=False)
    return layer(x, positions, cache)


def merge_moe_aux(name: str, moe_aux: Optional[dict], router: dict, losses: dict) -> None:
    """Collect one MoE layer's statistics under its name and sum its balance losses."""
    if moe_aux is None:
        return
    router[name] = moe_aux["router"]
    for loss_name, value in moe_aux["losses"].items():
        losses[loss_name] = losses.get(loss_name, 0.0) + value


class Transformer(nn.Module):
    """A DeepSeek-V3-style MoE language model (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from minimoe.mtp import MTPModule  # mtp builds DecoderLayer: import here, no cycle

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
            from minimoe import fp8

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
        if int(input_ids.max()) >= self.cfg.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size})")
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
                mtp_ce = self.mtp_losses(x, input_ids, targets, positions, router_stats, losses)
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

    def mtp_losses(self, hidden, input_ids, targets, positions, router_stats, losses) -> list:
        """Cross-entropy of each MTP depth k = 1..D (DeepSeek-V3 Eq. 21-24).

        Depth k at position i combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}.
        With targets[:, i] = t_{i+1}, that is input_ids[:, k:] for the embeddings and
        targets[:, k:] for the labels; each depth is one position shorter than the last.
        """
        T = input_ids.shape[1]
        ce_per_depth = []
        h = hidden  # h^0: the main model's last hidden state (before its final norm)
        for k, module in enumerate(self.mtp, start=1):
            h = h[:, : T - k]  # (B, T-k, C) positions that still have a token k ahead
            next_embeddings = self.embed_tokens(input_ids[:, k:])  # (B, T-k, C) Emb(t_{i+k})
            h, moe_aux = module(h, next_embeddings, positions[: T - k])  # (B, T-k, C)
            merge_moe_aux(f"mtp.{k - 1}", moe_aux, router_stats, losses)
            logits_k = self.lm_head(module.final_norm(h))  # (B, T-k, V) shared output head
            labels_k = targets[:, k:]  # (B, T-k) t_{i+k+1}
            ce_per_depth.append(F.cross_entropy(logits_k.float().reshape(-1, logits_k.shape[-1]),
                                                labels_k.reshape(-1), ignore_index=-100))
        return ce_per_depth

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
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Autoregressive sampling; see ``minimoe.generate.generate`` for the options."""
        from minimoe.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
