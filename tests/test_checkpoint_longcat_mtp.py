"""load_pretrained of LongCat-Flash's MTP module (model.mtp.*, the published layout): every MTP
tensor lands in model.mtp[0] (rope rows turned from interleaved to rotate-half, FP8 blocks
dequantised), the module's draft logits equal an independent forward from the raw tensors
(the serving code's structure, transformers' own MLA sublayer), the main logits still equal
transformers', speculative greedy decoding with the loaded module equals plain greedy
decoding, and checkpoints without or with broken MTP tensors load as before or fail naming
the tensor."""

import copy
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

import minimoe
from hf_weights import PARITY_ATOL, save_randomised
from minimoe.speculative import speculative_generate

transformers = pytest.importorskip("transformers")

ATOL = PARITY_ATOL  # measured <= 4.1e-6 (see hf_weights)
C, V, H, NOPE, ROPE, VHEAD, Q_LORA, KV_LORA, FFN = 32, 96, 4, 8, 4, 8, 16, 8, 40
BASE = dict(vocab_size=V, hidden_size=C, num_layers=3, num_attention_heads=H,
            ffn_hidden_size=FFN, q_lora_rank=Q_LORA, kv_lora_rank=KV_LORA,
            qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, head_dim=ROPE, v_head_dim=VHEAD,
            moe_topk=3, n_routed_experts=6, zero_expert_num=2, expert_ffn_hidden_size=12,
            max_position_embeddings=128, routed_scaling_factor=3.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e7})

# The published names of LongCat-Flash's MTP module -> (shape, minimoe parameter, rope rows).
# rope rows: None, or (rows per head, offset of the interleaved rope rows in a head).
MTP_TENSORS = {
    "model.mtp.layers.0.enorm.m.weight": ((C,), "mtp.0.enorm.weight", None),
    "model.mtp.layers.0.hnorm.m.weight": ((C,), "mtp.0.hnorm.weight", None),
    "model.mtp.layers.0.eh_proj.weight": ((C, 2 * C), "mtp.0.eh_proj.weight", None),
    "model.mtp.layers.0.input_layernorm.weight":
        ((C,), "mtp.0.block.input_layernorm.weight", None),
    "model.mtp.layers.0.post_attention_layernorm.weight":
        ((C,), "mtp.0.block.post_attention_layernorm.weight", None),
    "model.mtp.layers.0.self_attn.q_a_proj.weight":
        ((Q_LORA, C), "mtp.0.block.self_attn.q_a_proj.weight", None),
    "model.mtp.layers.0.self_attn.q_a_layernorm.weight":
        ((Q_LORA,), "mtp.0.block.self_attn.q_a_layernorm.weight", None),
    "model.mtp.layers.0.self_attn.q_b_proj.weight":
        ((H * (NOPE + ROPE), Q_LORA), "mtp.0.block.self_attn.q_b_proj.weight", (NOPE + ROPE, NOPE)),
    "model.mtp.layers.0.self_attn.kv_a_proj_with_mqa.weight":
        ((KV_LORA + ROPE, C), "mtp.0.block.self_attn.kv_a_proj_with_mqa.weight",
         (KV_LORA + ROPE, KV_LORA)),
    "model.mtp.layers.0.self_attn.kv_a_layernorm.weight":
        ((KV_LORA,), "mtp.0.block.self_attn.kv_a_layernorm.weight", None),
    "model.mtp.layers.0.self_attn.kv_b_proj.weight":
        ((H * (NOPE + VHEAD), KV_LORA), "mtp.0.block.self_attn.kv_b_proj.weight", None),
    "model.mtp.layers.0.self_attn.o_proj.weight":
        ((C, H * VHEAD), "mtp.0.block.self_attn.o_proj.weight", None),
    "model.mtp.layers.0.transformer_layer.mlp.gate_proj.weight":
        ((FFN, C), "mtp.0.block.mlp.gate_proj.weight", None),
    "model.mtp.layers.0.transformer_layer.mlp.up_proj.weight":
        ((FFN, C), "mtp.0.block.mlp.up_proj.weight", None),
    "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight":
        ((C, FFN), "mtp.0.block.mlp.down_proj.weight", None),
    "model.mtp.norm.weight": ((C,), "mtp.0.final_norm.weight", None),
}
EMBED_COPY = "model.mtp.embed_tokens.weight"


def _random_mtp_tensors(seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (shape, _, _) in MTP_TENSORS.items():
        noise = torch.randn(shape, generator=generator)
        tensors[name] = 1.0 + 0.2 * noise if len(shape) == 1 else noise / shape[-1] ** 0.5
    return tensors


def _rotate_half_rows(weight, rows_per_head, offset):
    """Interleaved rope rows [x0, y0, x1, y1, ...] of every head -> [x0, x1, ..., y0, y1, ...]."""
    heads = []
    for head in weight.split(rows_per_head, dim=0):
        rope = head[offset:offset + ROPE]
        heads.append(torch.cat([head[:offset], rope[0::2], rope[1::2], head[offset + ROPE:]]))
    return torch.cat(heads)


def _write_checkpoint(hf_folder, folder, mtp_tensors, config_changes=None):
    """The transformers checkpoint (sharded, with its index) plus one shard of MTP tensors."""
    shutil.copytree(hf_folder, folder, dirs_exist_ok=True)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if mtp_tensors:
        save_file(mtp_tensors, str(folder / "model-mtp.safetensors"))
        index["weight_map"].update({name: "model-mtp.safetensors" for name in mtp_tensors})
    index_path.write_text(json.dumps(index))
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("longcat_hf")
    model = transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(**BASE))
    return folder, save_randomised(model, folder, seed=3)


@pytest.fixture(scope="module")
def mtp_checkpoint(hf_checkpoint, tmp_path_factory):
    hf_folder, hf_model = hf_checkpoint
    written = _random_mtp_tensors(seed=4)
    # the published copy of the embedding equals the main one
    written[EMBED_COPY] = hf_model.model.embed_tokens.weight.detach().clone()
    folder = _write_checkpoint(hf_folder, tmp_path_factory.mktemp("longcat_mtp"), written)
    return folder, written, hf_model


def test_every_mtp_parameter_equals_the_written_tensor(mtp_checkpoint):
    folder, written, _ = mtp_checkpoint
    model = minimoe.load_pretrained(folder)
    assert model.cfg.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    assert not model.mtp[0].block.is_moe  # one MLA sublayer + a dense FFN
    params = dict(model.named_parameters())
    mtp_params = {n for n in params if n.startswith("mtp.")}
    assert mtp_params == {target for _, target, _ in MTP_TENSORS.values()}
    for name, (_, target, rope_rows) in MTP_TENSORS.items():
        expected = written[name] if rope_rows is None else _rotate_half_rows(written[name], *rope_rows)
        torch.testing.assert_close(params[target].detach(), expected, rtol=0, atol=0, msg=name)
    # the permutation really moved rows (a no-op would pass the check above only by chance)
    q_b = "model.mtp.layers.0.self_attn.q_b_proj.weight"
    assert not torch.equal(params[MTP_TENSORS[q_b][1]].detach(), written[q_b])
    # no own embedding: the MTP module reads the main one
    assert not any("embed" in n for n in mtp_params)


def reference_draft_logits(written: dict, hf_model, ids: torch.Tensor) -> torch.Tensor:
    """LongCat's MTP module from the raw tensors, as the engines that serve it run it (SGLang
    longcat_flash_nextn.py LongcatFlashModelNextN.forward, vLLM longcat_flash_mtp.py
    LongCatMultiTokenPredictorLayer.forward): h = the target model's output AFTER its final
    norm; x = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)]); one dense block (MLA sublayer, here
    transformers' LongcatFlashMLA loaded with the module's tensors, then a SwiGLU FFN);
    model.mtp.norm; the main lm_head. Returns (B, T-1, V): row i predicts t_{i+2}."""
    t, config, eps = written, hf_model.config, hf_model.config.rms_norm_eps
    p = "model.mtp.layers.0."

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    T = ids.shape[1]
    h = hf_model.model(ids).last_hidden_state[:, :T - 1]  # (B, T-1, C) after model.norm
    emb = hf_model.model.embed_tokens(ids[:, 1:])  # (B, T-1, C) Emb(t_{i+1})
    x = torch.cat([rms(emb, t[p + "enorm.m.weight"]), rms(h, t[p + "hnorm.m.weight"])], -1)
    x = x @ t[p + "eh_proj.weight"].T  # (B, T-1, C)
    eager = copy.deepcopy(config)
    eager._attn_implementation = "eager"
    attention = transformers.models.longcat_flash.modeling_longcat_flash.LongcatFlashMLA(eager, 0)
    attention.load_state_dict({name[len(p + "self_attn."):]: tensor for name, tensor in t.items()
                               if name.startswith(p + "self_attn.")})
    positions = torch.arange(T - 1)[None]  # (1, T-1)
    cos_sin = hf_model.model.rotary_emb(x, positions)
    causal = torch.full((T - 1, T - 1), torch.finfo(x.dtype).min).triu(1)[None, None]
    attended, _ = attention(rms(x, t[p + "input_layernorm.weight"]), cos_sin, causal)
    x = x + attended
    f = rms(x, t[p + "post_attention_layernorm.weight"])
    mlp = p + "transformer_layer.mlp."
    gate, up = f @ t[mlp + "gate_proj.weight"].T, f @ t[mlp + "up_proj.weight"].T
    x = x + (torch.nn.functional.silu(gate) * up) @ t[mlp + "down_proj.weight"].T
    return rms(x, t["model.mtp.norm.weight"]) @ hf_model.lm_head.weight.T  # (B, T-1, V)


def test_draft_logits_match_an_independent_forward_of_the_raw_tensors(mtp_checkpoint):
    """A check the loaded weights must pass (speculative greedy == plain greedy holds for any
    drafter): the module's draft logits equal the serving code's forward of the raw tensors,
    which feeds it the main state after the final norm (ModelConfig.mtp_input "post_norm")."""
    folder, written, hf_model = mtp_checkpoint
    model = minimoe.load_pretrained(folder)
    assert model.cfg.mtp_input == "post_norm"
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = reference_draft_logits(written, hf_model, ids)
        (got,) = minimoe.mtp.mtp_logits(model, ids)
        assert (got - expected).abs().max().item() <= ATOL
        model.cfg.mtp_input = "pre_norm"  # the residual stream instead: another function
        (pre_norm,) = minimoe.mtp.mtp_logits(model, ids)
        assert (pre_norm - expected).abs().max().item() > 0.1
        model.cfg.mtp_input = "post_norm"
        weight = model.mtp[0].block.mlp.down_proj.weight  # one tensor overwritten with noise
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(12))
                     / weight.shape[-1] ** 0.5)
        (noisy,) = minimoe.mtp.mtp_logits(model, ids)
        assert (noisy - expected).abs().max().item() > 0.1


def test_main_logits_still_match_transformers(mtp_checkpoint):
    folder, _, hf_model = mtp_checkpoint
    model = minimoe.load_pretrained(folder)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (model(ids).logits - hf_model(ids).logits).abs().max().item()
    assert diff <= ATOL


@pytest.mark.parametrize("num_draft_tokens", [1, 2])
def test_speculative_greedy_with_the_loaded_mtp_equals_plain_greedy(mtp_checkpoint,
                                                                    num_draft_tokens):
    folder, _, _ = mtp_checkpoint
    model = minimoe.load_pretrained(folder)
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(6))
    plain = model.generate(prompt, max_new_tokens=16, temperature=0.0)
    fast, stats = speculative_generate(model, prompt, max_new_tokens=16,
                                       num_draft_tokens=num_draft_tokens)
    assert torch.equal(fast, plain)
    assert stats.draft_forwards > 0 and sum(stats.proposed) > 0


def test_fp8_mtp_projections_are_dequantised(hf_checkpoint, tmp_path):
    hf_folder, _ = hf_checkpoint
    written = _random_mtp_tensors(seed=7)
    expected = {}
    for name, scale in (("model.mtp.layers.0.self_attn.q_b_proj.weight", 0.5),
                        ("model.mtp.layers.0.eh_proj.weight", 0.25)):
        fp8 = (written[name] / scale).to(torch.float8_e4m3fn)
        written[name] = fp8
        written[name + "_scale_inv"] = torch.full((1, 1), scale)  # one 128 x 128 block
        expected[name] = fp8.float() * scale
    model = minimoe.load_pretrained(_write_checkpoint(hf_folder, tmp_path, written))
    params = dict(model.named_parameters())
    for name, value in expected.items():
        _, target, rope_rows = MTP_TENSORS[name]
        want = value if rope_rows is None else _rotate_half_rows(value, *rope_rows)
        torch.testing.assert_close(params[target].detach(), want, rtol=0, atol=0)


def test_checkpoint_without_mtp_tensors_loads_without_mtp(hf_checkpoint):
    folder, hf_model = hf_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' checkpoints: no MTP, nothing to warn
        model = minimoe.load_pretrained(folder)
    assert model.cfg.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert (model(ids).logits - hf_model(ids).logits).abs().max().item() <= ATOL


def test_config_asking_for_mtp_without_the_tensors_warns(hf_checkpoint, tmp_path):
    folder = _write_checkpoint(hf_checkpoint[0], tmp_path, {},
                               config_changes={"num_nextn_predict_layers": 1})
    with pytest.warns(UserWarning, match=r"model\.mtp\.\*"):
        model = minimoe.load_pretrained(folder)
    assert len(model.mtp) == 0


def test_layer_subset_skips_the_mtp_module(mtp_checkpoint):
    folder, _, _ = mtp_checkpoint
    model = minimoe.load_pretrained(folder, layers=[0, 2])
    assert model.cfg.num_hidden_layers == 2 and len(model.mtp) == 0


def test_malformed_mtp_tensor_shape_names_the_tensor(hf_checkpoint, tmp_path):
    written = _random_mtp_tensors(seed=9)
    written["model.mtp.layers.0.eh_proj.weight"] = torch.zeros(C, C)  # not (C, 2C)
    folder = _write_checkpoint(hf_checkpoint[0], tmp_path, written)
    with pytest.raises(ValueError, match=r"model\.mtp\.layers\.0\.eh_proj\.weight.*\(32, 32\)"):
        minimoe.load_pretrained(folder)


def test_missing_or_unknown_mtp_tensors_are_errors_naming_them(hf_checkpoint, tmp_path):
    written = _random_mtp_tensors(seed=10)
    del written["model.mtp.layers.0.hnorm.m.weight"]
    folder = _write_checkpoint(hf_checkpoint[0], tmp_path / "missing", written)
    with pytest.raises(KeyError, match=r"mtp\.0\.hnorm\.weight"):
        minimoe.load_pretrained(folder)
    written = _random_mtp_tensors(seed=10)
    written["model.mtp.layers.1.eh_proj.weight"] = torch.zeros(C, 2 * C)  # only one MTP layer
    folder = _write_checkpoint(hf_checkpoint[0], tmp_path / "unknown", written)
    with pytest.raises(KeyError, match=r"model\.mtp\.layers\.1\.eh_proj\.weight"):
        minimoe.load_pretrained(folder)


def test_from_hf_refuses_more_than_one_mtp_module():
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        minimoe.ModelConfig.from_hf({**BASE, "model_type": "longcat_flash",
                                     "num_nextn_predict_layers": 2})
