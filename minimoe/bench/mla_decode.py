"""Benchmark: one MLA decoding step, naive (per-head K/V cache) vs absorbed (latent cache).

What is measured
----------------
One ``minimoe.mla.MultiHeadLatentAttention`` layer with DeepSeek-V3's MLA ratios but a
narrow body, so that it runs on a laptop CPU:

    hidden 1024, 16 heads, q_lora_rank 384, kv_lora_rank 512, qk_nope_head_dim 128,
    qk_rope_head_dim 64, v_head_dim 128            (V3: hidden 7168, 128 heads, q_lora 1536)

batch 1, float32. For each context length T (256 ... 8192) the cache is filled with what a
prefill of T random tokens leaves in it (the module's own projections; one layer needs no
attention to know its cache), then one new token is decoded at position T, ``--repeats``
times (the cache is truncated back to T after each step), in three modes:

* naive: the cache holds per-head k (T, H, 192) and v (T, H, 128): H * 320 = 5,120
  numbers per token (40,960 at V3's 128 heads);
* absorbed: the cache holds c_kv (T, 512) and k_pe (T, 64): 576 numbers per token at any
  head count; the query is projected into the 512-wide latent space;
* latent (the training-time path, minimoe's default): same cache as absorbed, but K and V
  are rebuilt from the whole latent at every step. Shown for scale; nobody decodes so.

Each step includes the cache append. ``KVCache.append`` concatenates, so it copies the
whole history, a cost proportional to the cache bytes. Serving runtimes preallocate (or
page) the cache and write one row in place; the columns "naive, in place" and "absorbed,
in place" time that case: the history of T + 1 tokens is already stored and ``append``
only hands it back, so they measure the attention arithmetic and its reads alone.

How to read it
--------------
Per cached token, naive reads H * (D_k + D_v) = 5,120 floats and does as many
multiply-adds; absorbed reads 576 floats but does H * (2 * 512 + 64) = 17,408
multiply-adds (every head scores and sums against the 512-wide latent). On a GPU, decoding
is bound by memory bandwidth and the absorbed path wins by the byte ratio; on a CPU with
its large caches and modest FLOP rate the two can come out close, and the table shows where
they cross. The byte ratio at this config is 5120 / 576 = 8.9x, at V3's 128 heads
40960 / 576 = 71x: the saving grows with the head count, the extra work per head does not
shrink.

    OMP_WAIT_POLICY=PASSIVE python -m minimoe.bench.mla_decode --threads 1
    python -m minimoe.bench.mla_decode --kv-figure-only      # kv_cache_presets.png only

Writes mla_decode_time.png and kv_cache_presets.png into runs/bench/mla_decode/ (``--publish``:
the committed copies in figures/; ``--figure-dir`` anywhere else) (the KV bytes per token
of the published presets, pure arithmetic from ``minimoe.sizing``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from minimoe import sizing
from minimoe.bench import progress, results_dir
from minimoe.cache import KVCache
from minimoe.config import ModelConfig
from minimoe.experiments import save_figure
from minimoe.mla import MultiHeadLatentAttention
from minimoe.rope import apply_rotary

CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
MODES = ("naive", "absorbed", "latent")


def bench_config(hidden: int = 1024, heads: int = 16) -> ModelConfig:
    """DeepSeek-V3's MLA widths on a narrow body (see the module docstring)."""
    return ModelConfig(
        vocab_size=256, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
        attention="mla", q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=0, intermediate_size=64,
        first_k_dense_replace=0, max_position_embeddings=16384,
    )


@torch.no_grad()
def prefilled_cache(mla: MultiHeadLatentAttention, x: torch.Tensor, mode: str) -> KVCache:
    """The cache a prefill of x (B, T, C) leaves: latents, or per-head k and v for 'naive'."""
    B, T, _ = x.shape
    c_kv, k_pe = mla.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    c_kv = mla.kv_a_layernorm(c_kv) * mla.mla_scale_kv_lora  # (B, T, d_c)
    cos, sin = mla.rotary_emb(torch.arange(T))
    k_pe = apply_rotary(k_pe[:, None], cos, sin)[:, 0]  # (B, T, rope)
    cache = KVCache(num_layers=1)
    if mode == "naive":
        k, v = mla._decompress(c_kv, k_pe)  # (B, H, T, qk_head_dim), (B, H, T, v_dim)
        cache.append(0, k=k.transpose(1, 2).contiguous(), v=v.transpose(1, 2).contiguous())
    else:
        cache.append(0, c_kv=c_kv.contiguous(), k_pe=k_pe.contiguous())
    cache.advance(T)
    return cache


class PreallocatedCache:
    """A stand-in for a preallocated cache: the history already holds the new row."""

    def __init__(self, cache: KVCache) -> None:
        self.layers = [dict(stored) for stored in cache.layers]
        self.length = cache.length - 1

    def append(self, layer_index: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.layers[layer_index])

    def advance(self, num_tokens: int) -> None:
        pass

    def truncate(self, length: int) -> None:
        pass


@torch.no_grad()
def time_decode(mla, cache: KVCache, token: torch.Tensor, mode: str, repeats: int) -> float:
    """Median seconds of one decoding step at position cache.length (cache restored after each)."""
    T = cache.length
    position = torch.tensor([T])
    runs = []
    for i in range(repeats + 2):  # two warm-up steps
        start = time.perf_counter()
        mla(token, position, cache, mode=mode)
        elapsed = time.perf_counter() - start
        cache.advance(1)
        cache.truncate(T)
        if i >= 2:
            runs.append(elapsed)
    return statistics.median(runs)


def run(contexts=CONTEXTS, repeats: int = 10, hidden: int = 1024, heads: int = 16,
        modes=MODES) -> list[dict]:
    torch.manual_seed(0)
    cfg = bench_config(hidden, heads)
    mla = MultiHeadLatentAttention(cfg, 0).eval()
    x = torch.randn(1, max(contexts) + 1, hidden)  # (B, T_max + 1, C)
    token = torch.randn(1, 1, hidden)  # (B, 1, C)
    rows = []
    bar = progress(len(contexts), "mla_decode", unit="context")
    for T in contexts:
        bar.update(1)
        row = {"context": T}
        for mode in modes:
            cache = prefilled_cache(mla, x[:, :T], mode)
            row[f"{mode}_ms"] = 1e3 * time_decode(mla, cache, token, mode, repeats)
            row[f"{mode}_values_per_token"] = cache.num_elements_per_token()
            row[f"{mode}_cache_mib"] = sum(t.numel() * t.element_size()
                                           for t in cache.layers[0].values()) / 2**20
            del cache
            if mode != "latent":
                static = PreallocatedCache(prefilled_cache(mla, x[:, :T + 1], mode))
                row[f"{mode}_inplace_ms"] = 1e3 * time_decode(mla, static, token, mode, repeats)
                del static
        rows.append(row)
    bar.close()
    return rows


def markdown_table(rows: list[dict], modes=MODES) -> str:
    head = ("| context | " + " | ".join(f"{m} (ms)" for m in modes) + " | naive / absorbed "
            "| naive, in place (ms) | absorbed, in place (ms) | naive / absorbed, in place "
            "| naive cache (MiB) | absorbed cache (MiB) |")
    lines = [head, "|" + "---:|" * (len(modes) + 7)]
    for r in rows:
        times = " | ".join(f"{r[f'{m}_ms']:.2f}" for m in modes)
        lines.append(f"| {r['context']} | {times} | {r['naive_ms'] / r['absorbed_ms']:.2f} | "
                     f"{r['naive_inplace_ms']:.2f} | {r['absorbed_inplace_ms']:.2f} | "
                     f"{r['naive_inplace_ms'] / r['absorbed_inplace_ms']:.2f} | "
                     f"{r['naive_cache_mib']:.1f} | {r['absorbed_cache_mib']:.2f} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_decode(rows: list[dict], path: str, title: str, modes=MODES) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    contexts = [r["context"] for r in rows]
    for mode, style in zip(modes, ("o-", "s-", "^--")):
        left.plot(contexts, [r[f"{mode}_ms"] for r in rows], style, label=mode)
    for mode, style, colour in (("naive", "o:", "tab:blue"), ("absorbed", "s:", "tab:orange")):
        left.plot(contexts, [r[f"{mode}_inplace_ms"] for r in rows], style, color=colour,
                  alpha=0.6, label=f"{mode}, in place")
    left.set(xscale="log", yscale="log", xlabel="context length (cached tokens)",
             ylabel="one decoding step (ms)", title="decode step time")
    left.set_xticks(contexts, [str(c) for c in contexts])
    left.xaxis.set_minor_locator(plt.NullLocator())
    left.legend(fontsize=8)
    for mode, style in zip(("naive", "absorbed"), ("o-", "s-")):
        right.plot(contexts, [r[f"{mode}_cache_mib"] for r in rows], style, label=mode)
    right.set(xscale="log", yscale="log", xlabel="context length (cached tokens)",
              ylabel="KV cache, one layer (MiB, float32)", title="cache size")
    right.set_xticks(contexts, [str(c) for c in contexts])
    right.xaxis.set_minor_locator(plt.NullLocator())
    right.legend()
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_kv_presets(path: str, context: int = 131072, bytes_per_element: float = 2) -> list[dict]:
    """Bar chart: each published preset's KV bytes per token (bf16) and at `context` tokens."""
    plt = _pyplot()
    rows = []
    for name in sizing.PUBLISHED_PRESETS:
        cfg = ModelConfig.preset(name)
        v = sizing.kv_cache_variants(cfg, bytes_per_element)
        rows.append({"name": name, "attention": cfg.attention, "own": v["own"], "mha": v["mha"]})
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["mha"] / 1024 for r in rows], width=0.4, color="0.75",
           label="same heads, MHA cache (naive for MLA)")
    colours = {"mla": "tab:green", "gqa": "tab:blue", "mha": "tab:red"}
    ax.bar([i + 0.2 for i in xs], [r["own"] / 1024 for r in rows], width=0.4,
           color=[colours[r["attention"]] for r in rows], label="as published")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['attention'].upper()}\n{r['own'] * context / 2**30:.1f} GiB",
                    (i + 0.2, r["own"] / 1024), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20, fontsize=8)
    ax.set(yscale="log", ylabel="KV cache per token, all layers (KiB, bf16)",
           title=f"KV cache per token; labels: the cache of one {context // 1024}K-token "
                 "sequence")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figure-dir", default=None, help="default: runs/bench/mla_decode "
                        "(with --publish: figures/, the committed copies)")
    parser.add_argument("--publish", action="store_true")
    parser.add_argument("--kv-figure-only", action="store_true")
    args = parser.parse_args(argv)
    args.figure_dir = args.figure_dir or ("figures" if args.publish else results_dir("mla_decode"))
    os.makedirs(args.figure_dir, exist_ok=True)
    plot_kv_presets(os.path.join(args.figure_dir, "kv_cache_presets.png"))
    if args.kv_figure_only:
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    cfg = bench_config(args.hidden, args.heads)
    print(f"MLA decode step, batch 1, float32, {args.threads} thread(s): hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, q_lora {cfg.q_lora_rank}, kv_lora {cfg.kv_lora_rank}, "
          f"nope {cfg.qk_nope_head_dim}, rope {cfg.qk_rope_head_dim}, v {cfg.v_head_dim}; "
          f"median of {args.repeats}")
    rows = run(args.contexts, args.repeats, args.hidden, args.heads)
    print()
    print(markdown_table(rows))
    r = rows[0]
    naive, absorbed = r["naive_values_per_token"], r["absorbed_values_per_token"]
    print()
    print(f"cache per token per layer: naive {naive}, absorbed {absorbed} values "
          f"({naive / absorbed:.1f}x); at V3's 128 heads 128 * 320 = 40960 vs 576 "
          f"({40960 / 576:.1f}x)")
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} cores)")
    title = (f"one MLA layer, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, V3 MLA "
             f"widths, batch 1, float32, CPU, {args.threads} thread(s)")
    plot_decode(rows, os.path.join(args.figure_dir, "mla_decode_time.png"), title)


if __name__ == "__main__":
    main()
