"""The passkey documents and the long-context experiment (a tiny end-to-end run)."""

import json
import random

import pytest
import torch

from minimoe import data as data_lib
from minimoe.config import ModelConfig
from minimoe.experiments import long_context
from minimoe.model import Transformer


@pytest.mark.parametrize("num_bytes", [47, 48, 129, 1025])
def test_passkey_document_layout(num_bytes):
    rng = random.Random(num_bytes)
    if num_bytes < 48:
        with pytest.raises(ValueError, match="shorter"):
            data_lib.generate_passkey_document(rng, num_bytes)
        return
    document, key = data_lib.generate_passkey_document(rng, num_bytes)
    assert len(document.encode("utf-8")) == num_bytes
    assert len(key) == 5 and key.isdigit()
    assert document.endswith(f"What is the passkey? {key}")
    assert f"The passkey is {key}. " in document
    # the key is the only source of digits: it appears exactly twice, nothing else is a digit
    assert sum(ch.isdigit() for ch in document) == 10


def test_passkey_depth_places_the_statement():
    start, _ = data_lib.generate_passkey_document(random.Random(0), 300, depth=0.0)
    end, _ = data_lib.generate_passkey_document(random.Random(0), 300, depth=1.0)
    assert start.startswith("The passkey is ")
    assert end.index("The passkey is ") == 300 - 22 - 26  # statement 22 bytes, question 26


def test_passkey_batch_is_deterministic_and_targets_end_with_the_key():
    x, y = data_lib.passkey_batch(random.Random(3), 4, 128)
    x2, y2 = data_lib.passkey_batch(random.Random(3), 4, 128)
    assert x.shape == y.shape == (4, 128) and x.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    for row_x, row_y in zip(x, y):
        text = bytes(row_x.tolist() + [row_y[-1].item()]).decode("ascii")
        assert text[-5:] == bytes(row_y[-5:].tolist()).decode("ascii")
        assert text.endswith("What is the passkey? " + text[-5:])


def test_rope_scaling_for_each_method():
    assert long_context.rope_scaling_for("none", 4, 128) is None
    assert long_context.rope_scaling_for("linear", 4, 128) == {"type": "linear", "factor": 4}
    assert long_context.rope_scaling_for("ntk", 8, 128) == {"type": "ntk", "factor": 8}
    yarn = long_context.rope_scaling_for("yarn", 8, 128)
    assert yarn["original_max_position_embeddings"] == 128 and yarn["mscale_all_dim"] == 1.0
    ablation = long_context.rope_scaling_for("yarn-no-mscale", 8, 128)
    assert ablation["attention_factor"] == 1.0 and "mscale_all_dim" not in ablation
    with pytest.raises(ValueError, match="unknown method"):
        long_context.rope_scaling_for("alibi", 2, 128)


def test_with_scaling_keeps_weights_and_changes_only_positions():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("toy-gqa", num_nextn_predict_layers=0, hidden_size=32,
                             num_hidden_layers=2, n_routed_experts=4, n_group=1, topk_group=1,
                             max_position_embeddings=64)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 256, (1, 16))
    same = long_context.with_scaling(model, "none", 4, 64).eval()
    torch.testing.assert_close(same(x).logits, model(x).logits)
    for method in ("linear", "ntk", "yarn", "yarn-no-mscale"):
        scaled = long_context.with_scaling(model, method, 4, 64).eval()
        assert scaled.cfg.rope_scaling["factor"] == 4
        for name, tensor in model.state_dict().items():
            assert torch.equal(scaled.state_dict()[name], tensor)
        assert not torch.allclose(scaled(x).logits, model(x).logits)


def test_experiment_end_to_end_tiny(tmp_path):
    out = tmp_path / "lc.json"
    argv = ["--train-len", "64", "--multiples", "2", "--steps", "2", "--rows", "4",
            "--finetune-steps", "1", "--corpus-tokens", "20000", "--passkey-docs", "8",
            "--loss-windows", "8", "--out", str(out), "--figure-dir", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        assert long_context.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    assert results["threads"] == 1 and results["train_len"] == 64
    assert set(results["eval"]) == {"64", "128"}
    assert set(results["eval"]["128"]) == set(long_context.METHODS)
    entry = results["eval"]["128"]["yarn"]
    assert len(entry["no_finetune"]["loss_by_bucket"]) == 2
    # 8 documents, 2 per depth quarter: the accuracy is a whole number of documents and the
    # mean of the quarters; a document retrieved has all its digits right
    passkey = entry["finetune"]["passkey"]
    assert passkey["accuracy"] * 8 == round(passkey["accuracy"] * 8)
    assert passkey["accuracy"] == pytest.approx(sum(passkey["accuracy_by_depth_quarter"]) / 4)
    assert passkey["accuracy"] <= passkey["digit_accuracy"] <= 1.0
    assert (tmp_path / "long_context.png").exists()


class PasskeyOracle(torch.nn.Module):
    """Reads the key from the statement in its input and predicts it at the question; gets the
    last digit wrong for documents whose statement starts before byte `wrong_before`."""

    def __init__(self, wrong_before: int = -1):
        super().__init__()
        self.wrong_before = wrong_before

    def forward(self, x):
        logits = torch.zeros(*x.shape, 256)  # (b, T, 256) bytes
        for row, ids in enumerate(x.tolist()):
            text = bytes(ids).decode("ascii")
            statement = text.index("The passkey is ")
            at = statement + len("The passkey is ")
            key = [ord(ch) for ch in text[at:at + 5]]
            if statement < self.wrong_before:
                key[-1] = ord("0") + (key[-1] - ord("0") + 1) % 10
            for j, byte in enumerate(key):  # position T-5+j predicts the key's digit j
                logits[row, x.shape[1] - 5 + j, byte] = 1.0
        return type("Out", (), {"logits": logits})()


def test_passkey_accuracy_scores_an_oracle_and_a_partly_wrong_one():
    right = long_context.passkey_accuracy(PasskeyOracle(), seq_len=256, docs=16, seed=5)
    assert right == {"accuracy": 1.0, "digit_accuracy": 1.0,
                     "accuracy_by_depth_quarter": [1.0, 1.0, 1.0, 1.0]}
    # 257-byte documents: the statement (22 bytes) starts at depth * (257 - 22 - 26), so
    # depths below 1/2 put it before byte 105: wrong in the first half, right after
    half = long_context.passkey_accuracy(PasskeyOracle(wrong_before=105), seq_len=256,
                                         docs=16, seed=5)
    assert half["accuracy"] == 0.5 and half["digit_accuracy"] == pytest.approx(0.9)
    assert half["accuracy_by_depth_quarter"] == [0.0, 0.0, 1.0, 1.0]
