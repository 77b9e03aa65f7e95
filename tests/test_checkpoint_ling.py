"""load_pretrained / from_hf for Ling-2.0 (model_type bailing_moe_v2), which transformers has no
class for. The test writes tiny checkpoints in the published layout (config.json with Ling's
key names, sharded safetensors + index, fused attention.query_key_value, QK layernorms,
gate.expert_bias, one tensor per expert) and computes the logits with its own plain-torch
forward pass straight from the raw tensors, written from the published modeling code's math
(inclusionAI modeling_bailing_moe_v2.py): GQA with per-head QK RMSNorm before a partial
rotate-half RoPE, sigmoid router + selection bias, groups scored by their top-2 sum, gates
renormalised and scaled, shared experts, the first layers dense."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import minimoe
from hf_weights import PARITY_ATOL
from minimoe.config import ModelConfig

SEQ = 20
ATOL = PARITY_ATOL  # measured <= 4.1e-6 (see hf_weights)
BASE = {
    "architectures": ["BailingMoeV2ForCausalLM"], "model_type": "bailing_moe_v2",
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "hidden_act": "silu",
    "use_qkv_bias": False, "use_bias": False, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 128, "rope_theta": 10000.0, "rope_scaling": None,
    "num_experts": 8, "num_shared_experts": 1, "num_experts_per_tok": 3, "n_group": 4,
    "topk_group": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1,
    "use_qk_norm": True, "partial_rotary_factor": 0.5, "num_nextn_predict_layers": 0,
    "moe_router_enable_expert_bias": True, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "score_function": "sigmoid", "torch_dtype": "float32",
}
CASES = {
    # Ling-mini-2.0's shape: half the head dims rotate, groups 2 of 4, one shared expert
    "mini-shaped": {},
    # q/k/v bias, Ling-1T's rotary_dim instead of partial_rotary_factor, no groups, two shared
    # experts, two dense layers
    "bias-rotary_dim": {"use_qkv_bias": True, "partial_rotary_factor": None, "rotary_dim": 4,
                        "n_group": 1, "topk_group": 1, "num_shared_experts": 2,
                        "first_k_dense_replace": 2},
}


# ---- the checkpoint, in the published layout ------------------------------------------------
def ling_tensor_shapes(c: dict, layer: int) -> dict:
    """Hub name -> shape for one layer (main stack or, at index >= num_hidden_layers, MTP)."""
    C, H, Hkv, D = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, I_e = c["num_experts"], c["moe_intermediate_size"]
    p = f"model.layers.{layer}."
    shapes = {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
              p + "attention.query_key_value.weight": ((H + 2 * Hkv) * D, C),
              p + "attention.query_layernorm.weight": (D,),
              p + "attention.key_layernorm.weight": (D,),
              p + "attention.dense.weight": (C, H * D)}
    if c["use_qkv_bias"]:
        shapes[p + "attention.query_key_value.bias"] = ((H + 2 * Hkv) * D,)
    if layer < c["first_k_dense_replace"]:
        I = c["intermediate_size"]
        shapes.update({p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C),
                       p + "mlp.down_proj.weight": (C, I)})
    else:
        shapes.update({p + "mlp.gate.weight": (E, C), p + "mlp.gate.expert_bias": (E,)})
        for e in range(E):
            shapes.update({p + f"mlp.experts.{e}.gate_proj.weight": (I_e, C),
                           p + f"mlp.experts.{e}.up_proj.weight": (I_e, C),
                           p + f"mlp.experts.{e}.down_proj.weight": (C, I_e)})
        I_s = I_e * c["num_shared_experts"]
        shapes.update({p + "mlp.shared_experts.gate_proj.weight": (I_s, C),
                       p + "mlp.shared_experts.up_proj.weight": (I_s, C),
                       p + "mlp.shared_experts.down_proj.weight": (C, I_s)})
    return shapes


def write_ling_checkpoint(folder, config: dict, seed: int, mtp_layers: int = 0) -> dict:
    """Random tensors under the hub names, three shards + index; returns {name: tensor}."""
    c = config
    C, V = c["hidden_size"], c["vocab_size"]
    shapes = {"model.word_embeddings.weight": (V, C), "model.norm.weight": (C,),
              "lm_head.weight": (V, C)}
    for layer in range(c["num_hidden_layers"] + mtp_layers):
        shapes.update(ling_tensor_shapes(c, layer))
    for k in range(mtp_layers):
        p = f"model.layers.{c['num_hidden_layers'] + k}."
        shapes.update({p + "enorm.weight": (C,), p + "hnorm.weight": (C,),
                       p + "eh_proj.weight": (C, 2 * C), p + "final_layernorm.weight": (C,)})
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):  # every RMSNorm gain: near one, not one
            tensors[name] = 1.0 + 0.2 * noise
        elif name.endswith("expert_bias"):
            tensors[name] = 0.1 * noise
        elif name.endswith(".bias"):
            tensors[name] = 0.5 * noise
        else:
            tensors[name] = noise / math.sqrt(shape[-1])
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({name: tensors[name] for name in shard}, str(folder / file_name))
        weight_map.update({name: file_name for name in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c))
    return tensors


# ---- an independent forward pass from the raw tensors ---------------------------------------
def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def swiglu(x, t, prefix):
    gate = x @ t[prefix + "gate_proj.weight"].T
    up = x @ t[prefix + "up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ t[prefix + "down_proj.weight"].T


def ling_rope(c: dict, T: int):
    """cos, sin (T, rot) of the partial rotate-half RoPE, and rot."""
    rot = c.get("rotary_dim") or int(c["head_dim"] * c["partial_rotary_factor"])
    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot)
    angles = torch.outer(torch.arange(T).float(), inv_freq)  # (T, rot/2)
    return torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin(), rot


def ling_layer(x: torch.Tensor, t: dict, c: dict, p: str, moe: bool) -> torch.Tensor:
    """One decoder layer under hub prefix p (BailingMoeV2DecoderLayer, or the block inside
    BailingMoeV2MTPLayer): x + attention(input_layernorm(x)), then x + MLP/MoE(post norm)."""
    B, T, C = x.shape
    H, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]
    cos, sin, rot = ling_rope(c, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
    qkv = h @ t[p + "attention.query_key_value.weight"].T
    if p + "attention.query_key_value.bias" in t:
        qkv = qkv + t[p + "attention.query_key_value.bias"]
    q, k, v = qkv.view(B, T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=2)
    q = rms_norm(q, t[p + "attention.query_layernorm.weight"], eps)
    k = rms_norm(k, t[p + "attention.key_layernorm.weight"], eps)
    c_, s_ = cos[None, :, None, :], sin[None, :, None, :]
    q = torch.cat([q[..., :rot] * c_ + rotate_half(q[..., :rot]) * s_, q[..., rot:]], -1)
    k = torch.cat([k[..., :rot] * c_ + rotate_half(k[..., :rot]) * s_, k[..., rot:]], -1)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhts,bshd->bthd", attn, v).reshape(B, T, H * D)
    x = x + out @ t[p + "attention.dense.weight"].T
    h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
    if not moe:
        return x + swiglu(h, t, p + "mlp.")
    flat = h.reshape(B * T, C)
    scores = torch.sigmoid(flat @ t[p + "mlp.gate.weight"].T)  # (N, E)
    choice = scores + t[p + "mlp.gate.expert_bias"]
    G = c["n_group"]
    group_scores = choice.view(B * T, G, -1).topk(2, dim=-1).values.sum(-1)  # (N, G)
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(c["topk_group"], dim=-1).indices, True)
    keep = kept.repeat_interleave(c["num_experts"] // G, dim=1)  # (N, E)
    idx = choice.masked_fill(~keep, float("-inf")).topk(c["num_experts_per_tok"], -1).indices
    weights = scores.gather(1, idx)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * c["routed_scaling_factor"]
    routed = torch.zeros_like(flat)
    for n in range(B * T):
        for j in range(idx.shape[1]):
            expert = f"{p}mlp.experts.{int(idx[n, j])}."
            routed[n] += weights[n, j] * swiglu(flat[n], t, expert)
    shared = swiglu(flat, t, p + "mlp.shared_experts.")
    return x + (routed + shared).view(B, T, C)


def ling_reference_hidden(t: dict, c: dict, ids: torch.Tensor, layers) -> torch.Tensor:
    """BailingMoeV2Model's output: the main layers, then the final norm (model.norm)."""
    x = t["model.word_embeddings.weight"][ids]  # (B, T, C)
    for i in layers:
        x = ling_layer(x, t, c, f"model.layers.{i}.", moe=i >= c["first_k_dense_replace"])
    return rms_norm(x, t["model.norm.weight"], c["rms_norm_eps"])


def ling_reference_logits(t: dict, c: dict, ids: torch.Tensor, layers) -> torch.Tensor:
    return ling_reference_hidden(t, c, ids, layers) @ t["lm_head.weight"].T


def ling_reference_mtp_logits(t: dict, c: dict, ids: torch.Tensor) -> list:
    """The MTP layers as BailingMoeV2Model.forward runs them: the first reads the main output
    AFTER model.norm; each rolls the ids one further left (t_{i+k} at position i), mixes
    [enorm(Emb) ; hnorm(h)] through eh_proj, runs its block, ends with its final_layernorm
    and feeds that to the next; BailingMoeV2ForCausalLM applies lm_head to it."""
    L, eps = c["num_hidden_layers"], c["rms_norm_eps"]
    h = ling_reference_hidden(t, c, ids, range(L))  # (B, T, C) post-norm
    logits = []
    for k in range(c["num_nextn_predict_layers"]):
        p = f"model.layers.{L + k}."
        ids = torch.roll(ids, shifts=-1, dims=-1)  # the wrapped tail is never compared
        emb = rms_norm(t["model.word_embeddings.weight"][ids], t[p + "enorm.weight"], eps)
        h = torch.cat([emb, rms_norm(h, t[p + "hnorm.weight"], eps)], -1) @ t[p + "eh_proj.weight"].T
        h = rms_norm(ling_layer(h, t, c, p, moe=True), t[p + "final_layernorm.weight"], eps)
        logits.append(h @ t["lm_head.weight"].T)  # (B, T, V): rows i < T-k-1 are compared
    return logits


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_an_independent_forward(case, tmp_path):
    config = {**BASE, **CASES[case]}
    seed = sorted(CASES).index(case)
    tensors = write_ling_checkpoint(tmp_path, config, seed=seed)
    model = minimoe.load_pretrained(tmp_path)
    cfg = model.cfg
    rotary = config.get("rotary_dim") or int(config["head_dim"] * config["partial_rotary_factor"])
    assert (cfg.attention, cfg.qk_norm, cfg.rotary_dim) == ("gqa", "per_head", rotary)
    state = model.state_dict()
    # the fused projection is split by rows: q (H*D), then k (H_kv*D), then v (H_kv*D)
    fused = tensors["model.layers.1.attention.query_key_value.weight"]
    torch.testing.assert_close(state["layers.1.self_attn.k_proj.weight"], fused[48:72])
    torch.testing.assert_close(state["layers.2.mlp.gate.e_score_correction_bias"],
                               tensors["model.layers.2.mlp.gate.expert_bias"])
    ids = torch.randint(0, config["vocab_size"], (2, SEQ),
                        generator=torch.Generator().manual_seed(50 + seed))
    with torch.no_grad():
        expected = ling_reference_logits(tensors, config, ids, range(config["num_hidden_layers"]))
        got = model(ids).logits
    assert (got - expected).abs().max().item() <= ATOL


def test_layer_subset(tmp_path):
    config = dict(BASE)
    tensors = write_ling_checkpoint(tmp_path, config, seed=5)
    model = minimoe.load_pretrained(tmp_path, layers=[0, 2])
    assert model.cfg.num_hidden_layers == 2 and model.cfg.first_k_dense_replace == 1
    ids = torch.randint(0, config["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ling_reference_logits(tensors, config, ids, [0, 2])
        assert (model(ids).logits - expected).abs().max().item() <= ATOL


def test_mtp_layers_match_the_published_forward(tmp_path):
    """Two MTP layers (model.layers.{3,4}): minimoe's draft logits of each depth equal the
    published code's (ling_reference_mtp_logits), which feeds them the normed main state."""
    config = {**BASE, "num_nextn_predict_layers": 2}
    tensors = write_ling_checkpoint(tmp_path, config, seed=7, mtp_layers=2)
    model = minimoe.load_pretrained(tmp_path)
    assert len(model.mtp) == 2 and model.cfg.mtp_input == "post_norm"
    state = model.state_dict()
    p = "model.layers.3."
    torch.testing.assert_close(state["mtp.0.final_norm.weight"], tensors[p + "final_layernorm.weight"])
    torch.testing.assert_close(state["mtp.0.block.self_attn.v_proj.weight"],
                               tensors[p + "attention.query_key_value.weight"][72:])
    ids = torch.randint(0, config["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ling_reference_mtp_logits(tensors, config, ids)
        got = minimoe.mtp.mtp_logits(model, ids)
        model.cfg.mtp_input = "pre_norm"  # the residual stream instead: another function
        pre_norm = minimoe.mtp.mtp_logits(model, ids)
    for k, (want, have, wrong) in enumerate(zip(expected, got, pre_norm), start=1):
        want = want[:, :SEQ - k]  # (B, T-k, V) rows that have a token k ahead
        assert (have - want).abs().max().item() <= ATOL, k
        assert (wrong - want).abs().max().item() > 0.1, k


def test_from_hf_of_ling_mini_matches_the_preset():
    # Ling-mini-2.0's published config.json (architecture keys)
    published = {**BASE, "vocab_size": 157184, "hidden_size": 2048, "intermediate_size": 5120,
                 "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4,
                 "head_dim": 128, "max_position_embeddings": 32768, "rope_theta": 600000,
                 "num_experts": 256, "num_shared_experts": 1, "num_experts_per_tok": 8,
                 "n_group": 8, "topk_group": 4, "moe_intermediate_size": 512,
                 "first_k_dense_replace": 1, "partial_rotary_factor": 0.5,
                 "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 0,
                 "torch_dtype": "bfloat16"}
    got = ModelConfig.from_hf(published).to_dict()
    preset = ModelConfig.preset("ling-mini-2.0").to_dict()
    differ = {k for k in got if got[k] != preset[k]}
    # training-only knobs are not in config.json: z-loss, bias update rate, MTP loss weight
    assert differ == {"name", "z_loss_coef", "bias_update_rate", "mtp_loss_weight"}, differ


@pytest.mark.parametrize("changes,key", [
    ({"use_bias": True}, "use_bias"),
    ({"score_function": "softmax"}, "score_function"),
    ({"norm_head": True}, "norm_head"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"num_shared_experts": 1, "moe_shared_expert_intermediate_size": 20},
     "moe_shared_expert_intermediate_size"),
])
def test_from_hf_refuses_keys_that_change_the_function(changes, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf({**BASE, **changes})


def test_misshaped_fused_projection_is_named(tmp_path):
    config = dict(BASE)
    write_ling_checkpoint(tmp_path, config, seed=9)
    wrong = {**config, "num_key_value_heads": 4}  # the file was written for 2 KV heads
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="query_key_value"):
        minimoe.load_pretrained(tmp_path)
