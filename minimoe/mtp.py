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

The embedding and the output head are *shared* with the main model; each module owns
enorm, hnorm, eh_proj, one decoder block and its final norm (called ``shared_head.norm`` in
DeepSeek's checkpoints, ``final_layernorm`` in Ling's, ``model.mtp.norm`` in LongCat's).
lambda was 0.3 for the first 10T tokens of V3's training, then 0.1.

Which hidden state is h^0? (``ModelConfig.mtp_input``)
-----------------------------------------------------
The report says only "the representation given by the main model". The main model's last
block leaves a residual-stream state x; the final RMSNorm turns it into norm(x), which the
output head reads. Every runtime that serves released MTP weights feeds the module
**norm(x), the state after the final norm** ("post_norm"), and, for depth k+1, module k's
output after its own final norm:

* DeepSeek-V3/V3.1: vLLM model_executor/models/deepseek_mtp.py,
  DeepSeekMultiTokenPredictorLayer.forward applies hnorm to previous_hidden_states,
  the target model's output: deepseek_v2.py DeepseekV2Model.forward returns
  self.norm(hidden_states, residual) (compute_logits applies the head to it
  directly), and v1/worker/gpu_model_runner.py hands those states to the drafter.
  SGLang models/deepseek_nextn.py DeepseekModelNextN.forward applies hnorm to
  spec_info.hidden_states, which layers/logits_processor.py
  LogitsProcessor.forward stores from the head's input, DeepseekV2Model.forward's
  normed output. DeepSeek's own inference/model.py has no MTP forward (its README
  leaves MTP to the community runtimes).
* GLM-4.5: vLLM glm4_moe_mtp.py Glm4MoeMultiTokenPredictorLayer.forward (target:
  glm4_moe.py Glm4MoeModel, head applied directly in compute_logits); SGLang
  glm4_moe_nextn.py Glm4MoeModelNextN.forward. Both as for DeepSeek.
* LongCat-Flash: vLLM longcat_flash_mtp.py LongCatMultiTokenPredictorLayer.forward
  (target: longcat_flash.py FlashModel.forward returns self.norm(...)); SGLang
  longcat_flash_nextn.py LongcatFlashModelNextN.forward; Meituan's own engine
  (meituan-longcat/SGLang-FluentLLM models/flash_nextn.py,
  FLASHModelNextN.forward): hnorm of the captured, normed target state.
* Ling-2.0 (bailing_moe_v2): inclusionAI's models/modeling_bailing_moe_v2.py,
  BailingMoeV2Model.forward: hidden_states = self.norm(hidden_states) and then the
  MTP layers, each fed the previous one's output after its final_layernorm
  (BailingMoeV2MTPLayer.forward); inclusionAI's SGLang patch
  (inference/sglang/bailing_moe_v2.patch, BailingMoEModelNextN.forward) and SGLang
  bailing_moe_nextn.py do the same; vLLM's Bailing drafters (bailing_mtp.py,
  bailing_moe_mtp.py) likewise.
* Training: Megatron-LM (which Ling-2.0 is trained with) models/gpt/gpt_model.py
  GPTModel._postprocess passes the decoder's output -- after TransformerBlock's
  final_layernorm -- to transformer/multi_token_prediction.py
  MultiTokenPredictionBlock.forward, whose layers each end with their own
  final_layernorm (MultiTokenPredictionLayer._postprocess) and feed the next.

minimoe therefore defaults to "post_norm" and the checkpoint families set it; "pre_norm"
(the residual stream, what minimoe fed before) remains for comparison. The state matters:
on the tests' tiny random checkpoints (logits of size ~4) the loaded modules agree with the
published code's forward to 2-4e-6 when fed the normed state, and differ by 1.8-3.4 when
fed the residual stream, while the main logits are unaffected. With every norm gain at one
(a fresh model) the two inputs coincide -- RMSNorm is scale-invariant -- so the difference
appears only as the final norm's gains are trained.

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


def first_input(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """h^0 as module 1 reads it: the main model's last state (B, T, C) -- after the final
    norm when cfg.mtp_input is "post_norm", the residual stream itself when "pre_norm"."""
    return model.norm(hidden) if model.cfg.mtp_input == "post_norm" else hidden


def next_input(cfg: ModelConfig, module: MTPModule, h: torch.Tensor) -> torch.Tensor:
    """Module k's block output h^k (B, T', C) as module k+1 reads it (same rule, its own
    final norm: Megatron-LM's MultiTokenPredictionBlock, Ling's BailingMoeV2Model)."""
    return module.final_norm(h) if cfg.mtp_input == "post_norm" else h


def mtp_depths(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
               positions: torch.Tensor):
    """Run depths k = 1..D over a whole sequence; yield (k, logits_k (B, T-k, V), moe_aux).

    Depth k at position i combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1};
    each depth is one position shorter than the last. hidden (B, T, C) is the main model's
    last state before its final norm (``ModelOutput.hidden``).
    """
    # BEGIN SOLUTION mtp-loss
    T = input_ids.shape[1]
    h = first_input(model, hidden)  # (B, T, C) h^0
    for k, module in enumerate(model.mtp, start=1):
        h = h[:, : T - k]  # (B, T-k, C) positions that still have a token k ahead
        next_embeddings = model.embed_tokens(input_ids[:, k:])  # (B, T-k, C) Emb(t_{i+k})
        out, moe_aux = module(h, next_embeddings, positions[: T - k])  # (B, T-k, C)
        yield k, module.logits(out, model.lm_head), moe_aux  # (B, T-k, V) shared output head
        h = next_input(model.cfg, module, out)  # (B, T-k, C) h^k for depth k+1
    # END SOLUTION


def mtp_losses(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
               targets: torch.Tensor, positions: torch.Tensor, router_stats: dict,
               losses: dict) -> list[torch.Tensor]:
    """Cross-entropy of each MTP depth k = 1..D of ``model`` (DeepSeek-V3 Eq. 21-24).

    With targets[:, i] = t_{i+1}, depth k's labels are targets[:, k:] (t_{i+k+1}). The
    modules' router statistics and balance losses are merged into router_stats / losses
    under "mtp.{k-1}". The weighted sum (lambda / D) * sum_k is the caller's
    (``minimoe.model.Transformer.forward``).
    """
    # BEGIN SOLUTION mtp-loss
    ce_per_depth = []
    for k, logits_k, moe_aux in mtp_depths(model, hidden, input_ids, positions):
        merge_moe_aux(f"mtp.{k - 1}", moe_aux, router_stats, losses)
        labels_k = targets[:, k:]  # (B, T-k) t_{i+k+1}
        ce_per_depth.append(F.cross_entropy(logits_k.float().reshape(-1, logits_k.shape[-1]),
                                            labels_k.reshape(-1), ignore_index=-100))
    return ce_per_depth
    # END SOLUTION


@torch.no_grad()
def mtp_logits(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The draft logits of every depth for a whole sequence (B, T): [(B, T-k, V) for k=1..D].

    Depth k's row i predicts t_{i+k+1}. One main forward pass, then the modules, as in
    training; used to compare a loaded module with the published code's forward.
    """
    out = model(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    return [logits for _, logits, _ in mtp_depths(model, out.hidden, input_ids, positions)]
