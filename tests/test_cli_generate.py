"""`minimoe generate`, `minimoe chat` and `minimoe convert fp8-to-bf16` run in-process on a tiny
saved checkpoint with a tiny tokenizer; their output is compared with the same decoding done
through the Python API (load_pretrained, the tokenizer, model.generate)."""

import io
import json

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

import minimoe  # noqa: E402
from hf_weights import randomise  # noqa: E402
from minimoe import cli  # noqa: E402
from minimoe.checkpoints.export import save_pretrained  # noqa: E402
from minimoe.checkpoints.tokenizer import load_tokenizer  # noqa: E402
from tiny_tokenizer import save_tokenizer  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    cfg = minimoe.ModelConfig.preset(
        "toy", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16,
        n_group=1, topk_group=1, num_nextn_predict_layers=1, max_position_embeddings=256)
    torch.manual_seed(0)
    model = randomise(minimoe.Transformer(cfg).eval(), 7)
    save_pretrained(model, folder, max_shard_size="100KB")
    assert save_tokenizer(folder) == VOCAB
    return folder


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _api_greedy(folder, ids, max_new_tokens, layers=None):
    model = minimoe.load_pretrained(folder, layers=layers)
    tokenizer = load_tokenizer(folder)
    out = model.generate(torch.tensor([ids]), max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True), len(out)


def test_generate_greedy_matches_the_api(checkpoint, capsys):
    prompt = "the router picks"
    code, out, err = _run(["generate", checkpoint, "--prompt", prompt, "--max-new-tokens", 12,
                           "--temperature", 0], capsys)
    assert code == 0, err
    tokenizer = load_tokenizer(checkpoint)
    expected, count = _api_greedy(checkpoint, tokenizer.encode(prompt), 12)
    assert out == prompt + expected + "\n"
    assert f"[{count} tokens in" in err and "tokens/s" in err

    # speculative decoding with the MTP module: the same greedy text, plus acceptance stats
    code, spec_out, err = _run(["generate", checkpoint, "--prompt", prompt, "--max-new-tokens",
                                12, "--temperature", 0, "--speculative"], capsys)
    assert code == 0, err
    assert spec_out == out and "drafts accepted per step" in err

    # expert offloading: the same text, and the cache counters
    code, off_out, err = _run(["generate", checkpoint, "--prompt", prompt, "--max-new-tokens",
                               12, "--temperature", 0, "--offload-experts", 2], capsys)
    assert code == 0, err
    assert off_out == out and "expert cache:" in err and "misses" in err


def test_generate_layers_dtype_and_sampling(checkpoint, capsys):
    prompt = "mixture of"
    code, out, err = _run(["generate", checkpoint, "--prompt", prompt, "--max-new-tokens", 6,
                           "--temperature", 0, "--layers", "0,2"], capsys)
    assert code == 0, err
    ids = load_tokenizer(checkpoint).encode(prompt)
    assert out == prompt + _api_greedy(checkpoint, ids, 6, layers=[0, 2])[0] + "\n"

    sampled = [_run(["generate", checkpoint, "--prompt", prompt, "--max-new-tokens", 8,
                     "--temperature", 1.0, "--top-k", 20, "--top-p", 0.9, "--seed", seed,
                     "--dtype", "bfloat16"], capsys) for seed in (1, 1)]
    assert sampled[0][0] == 0 and sampled[0][1] == sampled[1][1]  # the seed fixes the sample


def test_chat_reads_stdin_and_keeps_the_conversation(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you\n/reset\nhello\n/exit\n"
                                                 "never read\n"))
    code, out, err = _run(["chat", checkpoint, "--temperature", 0, "--max-new-tokens", 8,
                           "--system", "Be brief."], capsys)
    assert code == 0, err
    # the same conversation through the API
    model = minimoe.load_pretrained(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    replies, messages = [], [{"role": "system", "content": "Be brief."}]
    for text in ("hello", "how are you", None, "hello"):
        if text is None:  # /reset
            messages = messages[:1]
            continue
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages)
        new = model.generate(torch.tensor([ids]), 8,
                             eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        reply = tokenizer.decode(new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert out == "".join(reply + "\n" for reply in replies)
    assert replies[0] == replies[2]  # /reset really forgot the first exchange

    # a message too long for max_position_embeddings is refused and the chat goes on
    monkeypatch.setattr("sys.stdin", io.StringIO("hello " * 300 + "\nhello\n"))
    code, out, err = _run(["chat", checkpoint, "--temperature", 0, "--max-new-tokens", 8,
                           "--system", "Be brief."], capsys)
    assert code == 0 and "exceeds max_position_embeddings (256)" in err
    assert out == replies[0] + "\n"


def test_clear_errors(checkpoint, tmp_path, capsys):
    code, _, err = _run(["generate", tmp_path / "nothing-here", "--prompt", "x"], capsys)
    assert code == 2 and "is not a folder" in err
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text(
        (checkpoint / "config.json").read_text())
    code, _, err = _run(["generate", tmp_path / "no-tokenizer", "--prompt", "x"], capsys)
    assert code == 2 and "no tokenizer.json" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", str(checkpoint), "--prompt", "x", "--layers", "zero"])
    capsys.readouterr()
    code, _, err = _run(["generate", checkpoint, "--prompt", "x", "--max-new-tokens", 1000],
                        capsys)
    assert code == 2 and "max_position_embeddings" in err


def test_convert_fp8_to_bf16_command(checkpoint, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_checkpoint import _quantise_blocks

    # an FP8 version of the tiny checkpoint: every 2-D projection quantised in 128 x 128 blocks
    source = tmp_path / "fp8"
    source.mkdir()
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(checkpoint / shard), framework="pt") as handle:
            tensors = {}
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.dim() == 2 and "embed" not in name and "head" not in name:
                    tensors[name], tensors[name + "_scale_inv"] = _quantise_blocks(tensor)
                    weight_map[name + "_scale_inv"] = shard
                else:
                    tensors[name] = tensor
        save_file(tensors, str(source / shard))
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (source / "config.json").write_text(json.dumps(config))

    code, out, err = _run(["convert", "fp8-to-bf16", source, tmp_path / "bf16"], capsys)
    assert code == 0, err
    assert "dequantised from FP8" in out
    fp8 = minimoe.load_pretrained(source, dtype=torch.bfloat16)
    bf16 = minimoe.load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids).logits, fp8(ids).logits, rtol=0, atol=0)
    code, _, err = _run(["convert", "fp8-to-bf16", checkpoint, tmp_path / "again"], capsys)
    assert code == 2 and "not a block-FP8 checkpoint" in err
