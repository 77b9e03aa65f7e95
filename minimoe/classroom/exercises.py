"""The exercise registry: number, id, title, points and hint of every exercise.

The code of each exercise lives in the reference between ``# BEGIN SOLUTION <id>`` and
``# END SOLUTION`` lines; its tests are the pytest tests marked ``@pytest.mark.exercise(id)``
(``tests/exercises/`` for students and teacher, ``tests/classroom_private/`` teacher only).
Numbers follow the course, notebook by notebook (``book/instructor_guide.md`` has the syllabus).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    number: int
    id: str
    title: str
    points: int
    hint: str
    notebook: str  # the notebook whose cells need it


EXERCISES: tuple[Exercise, ...] = (
    Exercise(1, "router-scoring", "Router scores and gate weights (softmax or sigmoid, "
             "renormalised top-k, routed scaling)", 2,
             "scores = softmax or sigmoid of the logits; the gate weights are the top-k scores, "
             "divided by their sum when norm_topk_prob, times routed_scaling_factor "
             "(DeepSeek-V3 Eq. 12-13).", "02_routing_and_balance"),
    Exercise(2, "sorted-dispatch", "Sort-based dispatch and combine", 3,
             "flatten the N*k slots (drop masked ones), stable argsort by expert, bincount the "
             "group sizes, gather the token rows, grouped_swiglu(rows, counts, experts, backend), "
             "multiply by the gate weights, index_add_ back into an (N, C) zero tensor.",
             "01_moe_layer"),
    Exercise(3, "group-limited-routing", "Group-limited routing with -inf masking", 2,
             "view the biased scores as (N, n_group, E/n_group); score each group (max, or the "
             "sum of its top 2); keep the topk_group best groups and fill every other expert "
             "with -inf, not 0 (biased scores can be negative).", "02_routing_and_balance"),
    Exercise(4, "switch-aux-loss", "The Switch auxiliary loss", 1,
             "E * sum_i f_i * P_i with f_i = count_i / (N k) from bincount of topk_idx and P_i "
             "the mean probability of expert i over tokens; it is 1 for uniform routing.",
             "02_routing_and_balance"),
    Exercise(5, "sequence-aux-loss", "The sequence-wise auxiliary loss", 2,
             "per sequence: f_i = E / (k T) * (times i is chosen), P_i = mean over t of the "
             "scores normalised over experts; sum_i f_i P_i, averaged over the batch "
             "(DeepSeek-V3 Eq. 17-20).", "02_routing_and_balance"),
    Exercise(6, "aux-loss-free-bias", "The auxiliary-loss-free bias update", 2,
             "under torch.no_grad: delta = rate * sign(mean load - load); subtract its mean when "
             "zero_mean; add it to the bias in place (DeepSeek-V3 Section 2.1.2).",
             "02_routing_and_balance"),
    Exercise(7, "capacity-dropping", "Capacity factor and token dropping", 3,
             "C = expert_capacity(...); rank each token's slots by decreasing weight; queue all "
             "first choices in token order, then all second choices...; a cumulative count per "
             "expert (one_hot.cumsum) gives each slot's place; keep it when place < C.",
             "02_routing_and_balance"),
    Exercise(8, "mla-absorption", "MLA weight absorption (absorbed decode equals naive)", 3,
             "q_latent = einsum('bhtn,hnc->bhtc', q_nope, W_UK); scores = q_latent c_kv^T + "
             "q_pe k_pe^T, times self.scale, causal mask when T > 1, softmax in float32; "
             "out = einsum('bhtc,hvc->bhtv', weights @ c_kv, W_UV).", "03_attention_mla"),
    Exercise(9, "yarn", "The YaRN ramp and mscale", 2,
             "mscale(s) = 0.1 * m * ln(s) + 1; low, high = yarn_correction_range(...); "
             "ramp_i = clamp((i - low) / (high - low), 0, 1) over pair indices i; new f_i = "
             "f_i / s * ramp_i + f_i * (1 - ramp_i).", "04_positions_yarn"),
    Exercise(10, "mtp-loss", "The MTP loss with its embedding-first concatenation", 3,
             "combine cat([enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)]) -- embedding FIRST, as the "
             "released checkpoints; depth k uses h[:, :T-k], input_ids[:, k:] and labels "
             "targets[:, k:]; merge_moe_aux(f'mtp.{k-1}', ...); one cross-entropy per depth.",
             "05_mtp"),
    Exercise(11, "speculative-acceptance", "Speculative acceptance (greedy and rejection "
             "sampling)", 3,
             "greedy: accept drafts while they equal the main model's argmax, then take its "
             "next argmax; sampled: accept d_j with probability min(1, p/q), at the first "
             "rejection sample norm(max(0, p - q)); if all pass, sample p[m].", "05_mtp"),
    Exercise(12, "fp8-act-quant", "FP8 1x128 activation quantisation", 2,
             "pad K to a multiple of 128, view as (R, nb, 128) tiles, scale = "
             "_scale_from_amax(tile amax, ...), q = _to_fp8(tiles / scale); crop the padding "
             "and restore the leading dims.", "06_fp8"),
    Exercise(13, "triton-rmsnorm", "Triton RMSNorm forward (run under TRITON_INTERPRET=1)", 2,
             "mean_square = tl.sum(x * x, axis=0) / n_cols (masked lanes are 0); rstd = "
             "1 / tl.sqrt(mean_square + eps); store rstd; y = x * rstd * w cast to "
             "Y_ptr.dtype.element_ty; masked tl.store.", "07_kernels"),
)

BY_ID: dict[str, Exercise] = {exercise.id: exercise for exercise in EXERCISES}


def stub_message(exercise: Exercise) -> str:
    """The text of the NotImplementedError the student edition raises for ``exercise``."""
    return f"Exercise {exercise.number}: {exercise.title}. Hint: {exercise.hint}"


def total_points() -> int:
    return sum(exercise.points for exercise in EXERCISES)
