"""Experiment: stretching a short-context model to 4x and 8x its length (results for notebook 04).

The question
------------
A model trained on L positions meets longer inputs. How much do the RoPE scaling methods
of minimoe.rope help -- with and without a short fine-tune at the new length?

    none     plain RoPE, positions beyond L extrapolated
    linear   position interpolation, every frequency divided by s  (Chen et al. 2023)
    ntk      NTK-aware base theta * s^(d/(d-2))                     (bloc97 2023)
    yarn     NTK-by-parts ramp + temperature, DeepSeek convention   (Peng et al. 2023)
             (mscale = mscale_all_dim = 1: the softmax scale is multiplied by
             (0.1 ln s + 1)^2, beta_fast 32, beta_slow 1)
    yarn-no-mscale   an ablation: YaRN's frequencies with no temperature
             (attention_factor 1, no mscale keys), to separate the ramp from the mscale

with s = 4 at 4L and s = 8 at 8L (the factor matches the target length, as in practice).

Setup
-----
* Model: the ``toy-gqa`` preset (1.67M parameters, 4 layers, GQA 4/2 heads, head_dim 32,
  QK-norm, partial RoPE: 16 of 32 dims rotate) without its MTP module. GQA rather than the
  MLA ``toy``: the scaling methods act on the rotary dims in exactly the same way in both
  (MLA's rope part is also 16 dims), and at 1024 tokens the GQA toy runs about twice as
  fast on a CPU (the MLA reference rebuilds K and V from the latent at every layer).
* Training: L = 128 bytes; each batch is 8 windows of the synthetic corpus
  (``minimoe.data.build_corpus``) plus 8 passkey documents
  (``minimoe.data.passkey_batch``: prose filler, "The passkey is 48213. " at a random
  depth, "What is the passkey? 48213" at the end). Loss: next-byte cross-entropy on
  every byte plus, once more (KEY_WEIGHT = 1), the cross-entropy of the 5 key digits of
  the passkey rows. Without that extra term the key is 5 of 129 bytes of half the rows and
  the toy had not learned retrieval after 600 steps (per-digit accuracy 0.18, chance
  0.1); with it, retrieval at L is learned within about 900 steps.
* Scaling without fine-tune: the same weights loaded into a model rebuilt with
  ``cfg.replace(rope_scaling=...)`` (``inv_freq`` is a non-persistent buffer, so the
  state dict does not depend on the scaling).
* Fine-tune: every method, including "none", gets the *same* budget at the target length:
  ``--finetune-steps`` AdamW steps of 2048 tokens (B = 2048 / T rows, half corpus and half
  passkey), lr 1e-3 warmup 5 steps, cosine to 1e-4. YaRN and linear interpolation are
  normally used with such a fine-tune, NTK often without one; every method is reported
  both ways so each can be judged either way.
* Measured at T in {L, 4L, 8L}: per-position cross-entropy on held-out corpus windows
  (mean over positions [kL, (k+1)L), nats per byte), and passkey retrieval accuracy on
  ``--passkey-docs`` documents with the statement at evenly spaced depths: a document
  counts as retrieved when all 5 digits are the model's argmax (teacher forcing; the same
  as greedy decoding of the key), plus per-digit accuracy. Digits are 10-way, so chance
  is 0.1 per digit and 1e-5 per key.

One command regenerates the committed results (8.4 minutes on ONE CPU thread of a shared
2-core machine):

    python -m minimoe.experiments.long_context --publish

It writes runs/experiments/long_context/ (``--publish``: the committed
notebooks/results/long_context.json and figures/long_context.png). It sets
torch.set_num_threads(--threads, default 1); set OMP_WAIT_POLICY=PASSIVE in the
environment when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from minimoe import data as data_lib
from minimoe.config import ModelConfig
from minimoe.experiments import (add_output_arguments, output_paths, progress, save_figure,
                                 write_results)
from minimoe.model import Transformer
from minimoe.train import TrainArgs, learning_rate, make_optimizer

METHODS = ("none", "linear", "ntk", "yarn", "yarn-no-mscale")
KEY_DIGITS = 5
KEY_WEIGHT = 1.0  # extra weight of the key digits in the loss (see the module docstring)


def rope_scaling_for(method: str, factor: float, original: int) -> dict | None:
    """The ModelConfig.rope_scaling dict of one method at one factor."""
    if method == "none" or factor == 1:
        return None
    if method == "linear":
        return {"type": "linear", "factor": factor}
    if method == "ntk":
        return {"type": "ntk", "factor": factor}
    if method == "yarn":
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    if method == "yarn-no-mscale":  # the ablation: YaRN's frequencies, no temperature at all
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0}
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def with_scaling(model: Transformer, method: str, factor: float, original: int) -> Transformer:
    """A copy of `model` rebuilt with another rope_scaling (weights and buffers copied)."""
    cfg = model.cfg.replace(rope_scaling=rope_scaling_for(method, factor, original),
                            max_position_embeddings=max(model.cfg.max_position_embeddings,
                                                        int(original * factor)))
    rebuilt = Transformer(cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    return rebuilt


def mixed_batch(corpus, rng: random.Random, generator: torch.Generator, rows: int, seq_len: int):
    """Half corpus windows, half passkey documents (an odd row goes to the corpus)."""
    n_passkey = rows // 2
    x, y, _ = data_lib.sample_batch(corpus, rows - n_passkey, seq_len, generator)
    if n_passkey:
        px, py = data_lib.passkey_batch(rng, n_passkey, seq_len)
        x, y = torch.cat([x, px]), torch.cat([y, py])
    return x, y  # (rows, seq_len) each


def run_training(model: Transformer, corpus, steps: int, rows: int, seq_len: int, lr: float,
                 min_lr: float, warmup: int, seed: int, key_weight: float = KEY_WEIGHT,
                 bar=None) -> list[float]:
    """AdamW on the mixed batches (the loop of minimoe.train, with the passkey mix).

    The loss is the model's (next-byte cross-entropy on every byte) plus key_weight times
    the cross-entropy of the 5 key digits at the end of the passkey rows."""
    args = TrainArgs(steps=steps, lr=lr, min_lr=min_lr, warmup_steps=warmup)
    optimizer = make_optimizer(model, args)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x, y = mixed_batch(corpus, rng, generator, rows, seq_len)
        out = model(x, targets=y)
        n_passkey = rows // 2
        loss = out.loss
        if key_weight and n_passkey:
            key_logits = out.logits[-n_passkey:, -KEY_DIGITS:]  # (n_passkey, 5, V)
            loss = loss + key_weight * torch.nn.functional.cross_entropy(
                key_logits.reshape(-1, key_logits.shape[-1]), y[-n_passkey:, -KEY_DIGITS:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_expert_biases()
        losses.append(out.aux["losses"]["ce"].item())
        if bar is not None:
            bar.update(1)
    model.eval()
    return losses


@torch.no_grad()
def position_losses(model: Transformer, val_corpus, seq_len: int, bucket: int,
                    windows: int) -> list[float]:
    """Mean cross-entropy per position bucket [k*bucket, (k+1)*bucket) over corpus windows."""
    model.eval()
    total = torch.zeros(seq_len, dtype=torch.float64)
    count = 0
    for x, y, _ in data_lib.iterate_eval_batches(val_corpus, 8, seq_len):
        logits = model(x).logits  # (B, T, V)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
        total += ce.double().sum(0)
        count += x.shape[0]
        if count >= windows:
            break
    per_position = total / count  # (T,)
    return per_position.view(-1, bucket).mean(-1).tolist()  # (T / bucket,)


@torch.no_grad()
def passkey_accuracy(model: Transformer, seq_len: int, docs: int, seed: int) -> dict:
    """Retrieval on `docs` documents of seq_len + 1 bytes, statement depths evenly spaced."""
    model.eval()
    rng = random.Random(seed)
    hits, digit_hits, by_depth = [], [], []
    for start in range(0, docs, 8):
        depths = [(i + 0.5) / docs for i in range(start, min(docs, start + 8))]
        rows = [data_lib.passkey_batch(rng, 1, seq_len, depth=d) for d in depths]
        x = torch.cat([r[0] for r in rows])  # (b, T)
        y = torch.cat([r[1] for r in rows])  # (b, T)
        predicted = model(x).logits[:, -KEY_DIGITS:].argmax(-1)  # (b, 5)
        correct = predicted == y[:, -KEY_DIGITS:]  # (b, 5)
        hits += correct.all(-1).tolist()
        digit_hits += correct.float().mean(-1).tolist()
        by_depth += depths
    quarters = [[h for h, d in zip(hits, by_depth) if q / 4 <= d < (q + 1) / 4] for q in range(4)]
    return {"accuracy": sum(hits) / len(hits), "digit_accuracy": sum(digit_hits) / len(digit_hits),
            "accuracy_by_depth_quarter": [sum(q) / max(1, len(q)) for q in quarters]}


def evaluate(model: Transformer, val_corpus, seq_len: int, train_len: int, options) -> dict:
    return {"loss_by_bucket": position_losses(model, val_corpus, seq_len, train_len,
                                              options.loss_windows),
            "passkey": passkey_accuracy(model, seq_len, options.passkey_docs, options.seed + 99)}


def plot(results: dict, figure_dir: str = "figures") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = results["train_len"]
    multiples = results["multiples"]
    colors = {"none": "tab:gray", "linear": "tab:blue", "ntk": "tab:green", "yarn": "tab:red",
              "yarn-no-mscale": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    longest = str(multiples[-1] * L)
    for method in METHODS:
        for tuned, style in (("no_finetune", "--"), ("finetune", "-")):
            losses = results["eval"][longest][method][tuned]["loss_by_bucket"]
            centers = [(k + 0.5) * L for k in range(len(losses))]
            axes[0].plot(centers, losses, style, marker="o", ms=3, color=colors[method],
                         label=f"{method} ({'fine-tuned' if tuned == 'finetune' else 'as trained'})")
    axes[0].axvline(L, color="k", lw=0.8)
    axes[0].set(xlabel="position (bytes)", ylabel="cross-entropy (nats/byte)",
                title=f"Loss by position at {longest} = {multiples[-1]}x the training length")
    axes[0].legend(fontsize=7)
    width = 0.8 / len(METHODS)
    for panel, tuned in ((1, "no_finetune"), (2, "finetune")):
        for j, method in enumerate(METHODS):
            values = [results["eval"][str(m * L)][method][tuned]["passkey"]["accuracy"]
                      for m in multiples]
            xs = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(multiples))]
            axes[panel].bar(xs, values, width, color=colors[method], label=method)
        base = results["eval"][str(L)]["none"]["no_finetune"]["passkey"]["accuracy"]
        axes[panel].axhline(base, color="k", ls=":", lw=1, label=f"at {L} (trained)")
        axes[panel].set_xticks(range(len(multiples)), [f"{m * L} ({m}x)" for m in multiples])
        axes[panel].set(ylim=(0, 1.05), ylabel="passkey retrieval accuracy",
                        title="Passkey, " + ("as trained" if tuned == "no_finetune" else
                                             f"after the {results['finetune_steps']}-step fine-tune"))
        axes[panel].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    path = save_figure(fig, os.path.join(figure_dir, "long_context.png"), dpi=110)
    return [path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-len", type=int, default=128)
    parser.add_argument("--multiples", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--finetune-steps", type=int, default=80)
    parser.add_argument("--corpus-tokens", type=int, default=1_000_000)
    parser.add_argument("--passkey-docs", type=int, default=64)
    parser.add_argument("--loss-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser, "long_context")
    options = parser.parse_args(argv)
    results_path, figure_dir = output_paths(options, "long_context")
    bar = progress(options.steps + len(options.multiples) * len(METHODS) * options.finetune_steps,
                   "long_context (training steps)")
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    L = options.train_len

    corpus = data_lib.build_corpus(options.corpus_tokens, seed=options.seed)
    train_corpus, val_corpus = corpus.split(0.05)
    torch.manual_seed(options.seed)
    cfg = ModelConfig.preset("toy-gqa", num_nextn_predict_layers=0, max_position_embeddings=L)
    model = Transformer(cfg)
    print(f"training toy-gqa ({model.num_parameters() / 1e6:.2f}M) at {L} for {options.steps} steps",
          flush=True)
    train_losses = run_training(model, train_corpus, options.steps, options.rows, L,
                                lr=3e-3, min_lr=3e-4, warmup=30, seed=options.seed, bar=bar)
    train_seconds = time.perf_counter() - started

    results = {
        "command": "python -m minimoe.experiments.long_context",
        "threads": torch.get_num_threads(), "seed": options.seed, "preset": "toy-gqa",
        "overrides": {"num_nextn_predict_layers": 0, "max_position_embeddings": L},
        "parameters": model.num_parameters(), "rotary_dim": cfg.rotary_dim, "head_dim": cfg.head_dim,
        "train_len": L, "multiples": options.multiples, "steps": options.steps, "rows": options.rows,
        "finetune_steps": options.finetune_steps, "finetune_tokens_per_step": options.rows * L,
        "passkey_docs": options.passkey_docs, "key_weight": KEY_WEIGHT, "loss_windows": options.loss_windows,
        "train_ce_last50": sum(train_losses[-50:]) / 50, "train_seconds": train_seconds,
        "rope_scaling": {}, "eval": {}, "finetune_seconds": {},
    }
    results["eval"][str(L)] = {"none": {"no_finetune": evaluate(model, val_corpus, L, L, options)}}
    at_l = results["eval"][str(L)]["none"]["no_finetune"]
    bar.write(f"  at {L}: passkey {at_l['passkey']['accuracy']:.2f}, loss {at_l['loss_by_bucket']}")
    for multiple in options.multiples:
        T = multiple * L
        results["eval"][str(T)] = {}
        for method in METHODS:
            scaled = with_scaling(model, method, multiple, L)
            results["rope_scaling"][f"{method}@{multiple}"] = rope_scaling_for(method, multiple, L)
            entry = {"no_finetune": evaluate(scaled, val_corpus, T, L, options)}
            tic = time.perf_counter()
            rows = max(2, options.rows * L // T)
            run_training(scaled, train_corpus, options.finetune_steps, rows, T, lr=1e-3,
                         min_lr=1e-4, warmup=5, seed=options.seed + multiple, bar=bar)
            results["finetune_seconds"][f"{method}@{multiple}"] = time.perf_counter() - tic
            entry["finetune"] = evaluate(scaled, val_corpus, T, L, options)
            entry["finetune_rows"] = rows
            results["eval"][str(T)][method] = entry
            bar.write(f"  {T} {method:14s}: passkey {entry['no_finetune']['passkey']['accuracy']:.2f}"
                  f" -> {entry['finetune']['passkey']['accuracy']:.2f} (fine-tuned); last-bucket loss "
                  f"{entry['no_finetune']['loss_by_bucket'][-1]:.3f} -> "
                  f"{entry['finetune']['loss_by_bucket'][-1]:.3f}")
    bar.close()
    results["total_minutes"] = (time.perf_counter() - started) / 60
    write_results(results, results_path)
    print(f"total {results['total_minutes']:.1f} min; wrote", results_path,
          *plot(results, figure_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
