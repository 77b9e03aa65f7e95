"""The one kernel switch, ModelConfig.kernels = "reference" | "triton" (minimoe.kernel_switch).

On this CPU-only machine "triton" either runs the kernels through Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported; see tests/test_kernels_rmsnorm.py)
or, without it, warns once and runs the reference path. The second case needs a process in
which triton was never put in interpreter mode, so it runs in a fresh interpreter.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import minimoe  # noqa: E402
from minimoe import kernel_switch  # noqa: E402

SMALL = dict(num_hidden_layers=2)


def twin_models(preset: str):
    """The same weights twice: kernels="reference" and kernels="triton"."""
    torch.manual_seed(0)
    reference = minimoe.Transformer(minimoe.ModelConfig.preset(preset, **SMALL))
    torch.manual_seed(0)
    triton_model = minimoe.Transformer(minimoe.ModelConfig.preset(preset, kernels="triton", **SMALL))
    return reference, triton_model


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, targets=ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                 if p.grad is not None}


def test_reference_is_the_default_and_asks_for_no_kernel():
    assert minimoe.ModelConfig.preset("toy").kernels == "reference"
    x = torch.randn(2, 8)
    assert kernel_switch.current_kernels() == "reference"
    assert kernel_switch.rmsnorm_kernel(x) is None and kernel_switch.rotary_kernel(x) is None
    with kernel_switch.use_kernels("triton"):
        assert kernel_switch.current_kernels() == "triton"
    assert kernel_switch.current_kernels() == "reference"


def test_unknown_choices_are_rejected():
    with pytest.raises(ValueError, match="kernels must be one of"):
        with kernel_switch.use_kernels("cuda"):
            pass
    with pytest.raises(ValueError, match="kernels"):
        minimoe.ModelConfig.preset("toy", kernels="cuda")


@pytest.mark.parametrize("preset", ["toy", "toy-gqa"])  # MLA + full rotary; GQA + partial rotary + QK-norm
def test_triton_under_the_interpreter_matches_reference(preset, kernels_used):
    pytest.importorskip("triton")
    if not kernel_switch.triton_interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    reference, triton_model = twin_models(preset)
    ids = torch.randint(0, reference.cfg.vocab_size, (2, 7))
    logits_ref, grads_ref = loss_and_grads(reference, ids)
    logits, grads = loss_and_grads(triton_model, ids)
    assert {"rmsnorm", "rope"} <= set(kernels_used)  # the kernels really ran
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)

    # activation checkpointing recomputes the layers in backward with the same kernels
    triton_model.gradient_checkpointing = True
    _, grads_checkpointed = loss_and_grads(triton_model, ids)
    for name in grads:
        torch.testing.assert_close(grads_checkpointed[name], grads[name], msg=name)


WITHOUT_INTERPRETER = textwrap.dedent("""
    import json, sys, warnings
    import torch, minimoe
    torch.manual_seed(0)
    reference = minimoe.Transformer(minimoe.ModelConfig.preset("toy-gqa", num_hidden_layers=2))
    ids = torch.randint(0, reference.cfg.vocab_size, (2, 7))
    out_ref = reference(ids, targets=ids)
    out_ref.loss.backward()
    triton_imported = "triton" in sys.modules
    torch.manual_seed(0)
    model = minimoe.Transformer(minimoe.ModelConfig.preset("toy-gqa", kernels="triton",
                                                           num_hidden_layers=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, targets=ids)
        out.loss.backward()
        model(ids)  # a second call: no second warning
    same = torch.equal(out.logits, out_ref.logits) and all(
        torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters())
        if q.grad is not None)
    print(json.dumps({"triton_imported_by_reference": triton_imported, "same": same,
                      "warnings": [str(w.message) for w in caught
                                   if issubclass(w.category, RuntimeWarning)]}))
""")


def test_without_cuda_or_interpreter_warns_once_and_runs_the_reference():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: kernels='triton' runs the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_INTERPRETER], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["triton_imported_by_reference"] is False  # importing minimoe never needs triton
    assert report["same"] is True  # bit-identical: it *is* the reference path
    assert len(report["warnings"]) == 1, report["warnings"]
    message = report["warnings"][0]
    assert "no CUDA GPU" in message and "reference" in message and "TRITON_INTERPRET=1" in message
