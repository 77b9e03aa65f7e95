"""torch.compile on the Transformer: forward and backward equal eager for every dispatch and
attention kind; the sorted dispatch traces without a graph break (minimoe.traceable)."""

import pytest
import torch

import minimoe
from minimoe.traceable import count_per_expert, grouped_mm

ATTENTION = {"mla": {}, "gqa": dict(attention="gqa", num_key_value_heads=2),
             "mha": dict(attention="mha", num_key_value_heads=4)}


def tiny_model(dispatch: str, attention: str, mtp: bool = False) -> minimoe.Transformer:
    """One dense and one MoE layer of 4 experts (compile time grows with the graph)."""
    torch.manual_seed(0)
    cfg = minimoe.ModelConfig.preset(
        "toy", num_hidden_layers=2, dispatch=dispatch, n_routed_experts=4, n_group=2,
        topk_group=1, num_nextn_predict_layers=int(mtp), **ATTENTION[attention])
    return minimoe.Transformer(cfg)


def compare_with_eager(model, backend: str) -> None:
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, dims=1)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(ids, targets=targets)
    out.loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = model(ids, targets=targets)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    eager_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    # the router statistics come out as numbers in both
    stats = out.aux["router"]["layers.1"]
    assert float(stats["max_vio"]) == pytest.approx(ref.aux["router"]["layers.1"]["max_vio"])


@pytest.mark.parametrize("dispatch", ["sorted", "naive"])
@pytest.mark.parametrize("attention", ["mla", "gqa", "mha"])
def test_compiled_training_step_equals_eager(dispatch, attention):
    """Dynamo + AOTAutograd on fake tensors (where the float32 _grouped_mm failed), every mode."""
    compare_with_eager(tiny_model(dispatch, attention, mtp=attention == "mla"),
                       backend="aot_eager")


def test_inductor_forward_backward_equals_eager():
    """The whole stack, generated C++ kernels included, on the default sorted dispatch."""
    compare_with_eager(tiny_model("sorted", "mla"), backend="inductor")


def test_graph_breaks():
    ids = torch.randint(0, 256, (2, 12))
    torch._dynamo.reset()
    sorted_explained = torch._dynamo.explain(tiny_model("sorted", "mla"))(ids, targets=ids)
    assert sorted_explained.graph_break_count == 0, sorted_explained.break_reasons
    torch._dynamo.reset()
    naive_explained = torch._dynamo.explain(tiny_model("naive", "gqa"))(ids, targets=ids)
    # the naive loop's torch.where per expert has a data-dependent shape: breaks, by design
    assert naive_explained.graph_break_count > 0
    assert all("Dynamic shape operator" in str(b.reason) or "fake tensor" in str(b.reason)
               for b in naive_explained.break_reasons)


def test_grouped_mm_custom_op_matches_loop_in_float32():
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 0, 5, 4]
    a = torch.randn(12, 8, generator=gen, requires_grad=True)
    b = torch.randn(4, 8, 16, generator=gen, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    out = torch.compile(grouped_mm, backend="aot_eager", fullgraph=True)(a, b, offs)
    grad = torch.randn(12, 16, generator=gen)
    out.backward(grad)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = torch.cat([block @ w for block, w in zip(a2.split(sizes), b2.unbind(0))])
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    assert b.grad[1].abs().sum() == 0  # the expert with no rows gets no gradient


def test_count_per_expert_equals_bincount():
    idx = torch.tensor([3, 0, 3, 5, 1, 3])
    assert torch.equal(count_per_expert(idx, 8), torch.bincount(idx, minlength=8))


def test_bad_token_ids_still_raise_when_compiled():
    model = tiny_model("sorted", "mla")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(RuntimeError, match="vocab_size"):
        compiled(torch.full((1, 4), 300))
