"""Multi-token prediction (MTP): each extra module predicts one more token ahead.

The idea (DeepSeek-V3 technical report §2.2, after Gloeckle et al. 2024)
-----------------------------------------------------------------------
A next-token model gets one training signal per position. MTP adds D small sequential
modules; module k predicts the token k+1 steps ahead of position i, *conditioned on the
previous depth's representation*, so the causal chain is kept (unlike Gloeckle et al.'s
parallel heads). The signal densifies training, and at inference the modules can be
dropped -- or reused as a draft model for speculative decoding.

Module k at position i (V3 Eq. 21-23):

    h'_i^k   = M_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1}) ]     # (2C) -> (C), "eh_proj"
    h_i^k    = TRM_k(h'_i^k)                                         # one transformer block
    P_{i+k+1}^k = OutHead(RMSNorm(h_i^k))                            # shared output head

    L_MTP^k  = CE(P^k, t_{i+k+1})      L_MTP = (lambda / D) * sum_k L_MTP^k   (Eq. 24-25)

h_i^0 is the main model's final hidden state (before its last norm). The embedding and
the output head are *shared* with the main model; each module owns enorm, hnorm, eh_proj,
one decoder block and its final norm (called ``shared_head.norm`` in the checkpoints).
lambda was 0.3 for the first 10T tokens of V3's training, then 0.1.

Which half comes first in the concatenation? Eq. 21 of the report writes [h ; Emb], but
the released checkpoints (and DeepSeek's and SGLang's inference code) concatenate the
*embedding first*: eh_proj's input columns 0..C-1 multiply enorm(Emb(t_{i+k})) and columns
C..2C-1 multiply hnorm(h). For a model trained from scratch the order is a relabelling of
eh_proj's columns; for loading published weights it decides whether the output is right.
minimoe follows the checkpoints.

What the reader should notice: an MTP module is a full transformer block (in V3 with an
MoE FFN: its router statistics are reported beside the main layers' as "mtp.{k}"), so MTP
adds parameters (V3's MTP module has ~14B of the 685B on the hub) but little compute.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimoe.block import DecoderLayer, merge_moe_aux
from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.norm import RMSNorm


class MTPModule(nn.Module):
    """MTP depth k: combine h^{k-1} with Emb(t_{i+k}), run one block (see module docstring)."""

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # for Emb(t_{i+k})
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # for h^{k-1}_i
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        # The block sits after the main stack (V3 stores it as layers.61); it is an MoE block
        # whenever the model is an MoE model.
        self.block = DecoderLayer(cfg, layer_index=cfg.num_hidden_layers + depth - 1)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # "shared_head.norm"

    def forward(
        self, previous_hidden: torch.Tensor, next_token_embeddings: torch.Tensor,
        positions: torch.Tensor, cache: Optional[KVCache] = None,
    ) -> tuple[torch.Tensor, dict | None]:
        """previous_hidden (B, T', C) = h^{k-1}; next_token_embeddings (B, T', C) = Emb(t_{i+k}).

        With a cache (decoding, ``minimoe.speculative``) the block's attention appends its
        keys/values (MLA: the latent) to this module's own cache, which then advances by T'.
        """
        # BEGIN SOLUTION mtp-loss
        combined = torch.cat(
            [self.enorm(next_token_embeddings), self.hnorm(previous_hidden)], dim=-1
        )  # (B, T', 2C) embedding first, as in the released checkpoints
        # END SOLUTION
        h = self.eh_proj(combined)  # (B, T', C)
        h, moe_aux = self.block(h, positions, cache)  # (B, T', C)
        if cache is not None:
            cache.advance(h.shape[1])
        return h, moe_aux

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """(B, T', C) -> (B, T', V): this module's final norm, then the shared output head."""
        return lm_head(self.final_norm(hidden))


def mtp_losses(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
               targets: torch.Tensor, positions: torch.Tensor, router_stats: dict,
               losses: dict) -> list[torch.Tensor]:
    """Cross-entropy of each MTP depth k = 1..D of ``model`` (DeepSeek-V3 Eq. 21-24).

    Depth k at position i combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}.
    With targets[:, i] = t_{i+1}, that is input_ids[:, k:] for the embeddings and
    targets[:, k:] for the labels; each depth is one position shorter than the last.
    hidden (B, T, C) is h^0; the modules' router statistics and balance losses are merged
    into router_stats / losses under "mtp.{k-1}". The weighted sum (lambda / D) * sum_k is
    the caller's (``minimoe.model.Transformer.forward``).
    """
    # BEGIN SOLUTION mtp-loss
    T = input_ids.shape[1]
    ce_per_depth = []
    h = hidden  # h^0: the main model's last hidden state (before its final norm)
    for k, module in enumerate(model.mtp, start=1):
        h = h[:, : T - k]  # (B, T-k, C) positions that still have a token k ahead
        next_embeddings = model.embed_tokens(input_ids[:, k:])  # (B, T-k, C) Emb(t_{i+k})
        h, moe_aux = module(h, next_embeddings, positions[: T - k])  # (B, T-k, C)
        merge_moe_aux(f"mtp.{k - 1}", moe_aux, router_stats, losses)
        logits_k = module.logits(h, model.lm_head)  # (B, T-k, V) shared output head
        labels_k = targets[:, k:]  # (B, T-k) t_{i+k+1}
        ce_per_depth.append(F.cross_entropy(logits_k.float().reshape(-1, logits_k.shape[-1]),
                                            labels_k.reshape(-1), ignore_index=-100))
    return ce_per_depth
    # END SOLUTION
