"""What torch.compile needs from minimoe: a traceable grouped matmul, static counts, checks.

How torch.compile sees a model
------------------------------
``torch.compile(model)`` (PyTorch 2, Ansel et al. 2024, "PyTorch 2: Faster Machine Learning
Through Dynamic Python Bytecode Transformation and Graph Compilation") has two parts.
TorchDynamo runs the Python forward once with *fake* tensors (shapes and dtypes, no data)
and records every tensor operation into a graph; TorchInductor turns that graph into fused
C++ (CPU) or Triton (GPU) code. Whatever Dynamo cannot record splits the graph in two
(a *graph break*): Python runs the piece in between eagerly, and every break costs a
return to the interpreter and blocks fusion across it. Three things in an MoE model
cause breaks, and this module holds the cure for each:

1. Reading a tensor's *value* in Python (``int(t.max())``, ``float(loss)``, ``t.tolist()``)
   needs real data, which fake tensors do not have. ``check`` below keeps the value checks
   of eager mode as ``torch._assert_async`` inside the graph when compiling.
2. Operators whose output *shape* depends on data: ``torch.bincount(idx, minlength=E)`` is
   (max(E, max(idx) + 1),), ``torch.where(mask)`` has as many rows as True entries.
   ``count_per_expert`` counts with a scatter-add into E zeros: always (E,). The naive
   dispatch's ``torch.where`` per expert stays: one break per expert is the price of the
   readable reference loop (``torch._dynamo.explain`` counts them; tests print the count).
3. Operators whose meta (fake-tensor) function is stricter than their kernel (next section).

The grouped matmul under torch.compile
--------------------------------------
``minimoe.moe.dispatch_sorted`` multiplies each expert's contiguous block of rows by that
expert's matrix with one call, ``torch._grouped_mm(a (M, K), b (E, K, N), offs (E,))``.
Eager PyTorch runs it on a CPU in float32, bfloat16 and float16. torch.compile, however,
never runs an operator while it traces: it runs the operator's *meta* (fake-tensor)
function, which only computes the output's shape and dtype. On the CPU build of torch 2.13
that meta function of ``_grouped_mm`` accepts bfloat16 operands only (it copies the CUDA
kernel's checks), so tracing the float32 sorted dispatch stops with "Expected inputs of
BF16 type" although the eager kernel would have run.

The cure is the mechanism PyTorch offers for operators the compiler should treat as a
black box (``torch.library.custom_op``, the "Python custom operators" tutorial):

* ``minimoe::grouped_mm`` calls ``torch._grouped_mm`` in eager, unchanged;
* its fake function says what the compiler needs to know: the result is (M, N) in a's
  dtype, nothing more -- no dtype check, so float32 traces;
* its backward is a second custom op, ``minimoe::grouped_mm_backward``, whose eager body
  runs the two grouped products of the gradient with ``torch._grouped_mm`` (dA = GMM(dY,
  B^T) and dB_e = A_e^T dY_e, as ``minimoe.moe`` describes) and whose fake function
  returns tensors shaped like a and b.

Inductor then compiles everything around the two calls (router, gathers, SwiGLU, combine)
and calls the eager kernel for the grouped products themselves. In eager mode
``minimoe.moe`` keeps calling ``torch._grouped_mm`` directly: the custom op is used only
while ``torch.compiler.is_compiling()``, so nothing changes for a reader who never compiles.
"""

from __future__ import annotations

import torch


def check(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the boolean 0-dim tensor `condition` holds.

    Eager: a plain Python check (reads the value). Under torch.compile: an assertion inside
    the graph (``torch._assert_async``; a RuntimeError carrying the same message when it
    fails), so the check costs no graph break.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(M,) long expert ids in [0, num_experts) -> (num_experts,) long counts.

    ``torch.bincount(expert_index, minlength=num_experts)`` computes the same numbers, but
    its output length depends on the largest index, which breaks a compiled graph; a
    scatter-add into num_experts zeros always has num_experts entries.
    """
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)  # (E,)
    return counts.index_add_(0, expert_index, torch.ones_like(expert_index))  # (E,)


@torch.library.custom_op("minimoe::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) rows in E blocks ending at offs (E,) int32; b (E, K, N) -> (M, N)."""
    return torch._grouped_mm(a, b, offs=offs).contiguous()  # (M, N)


@grouped_mm.register_fake
def _grouped_mm_fake(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])  # (M, N) shape and dtype only


@torch.library.custom_op("minimoe::grouped_mm_backward", mutates_args=())
def grouped_mm_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/da (M, K), dL/db (E, K, N)) for out = grouped_mm(a, b, offs) and dL/dout = grad.

    Both are grouped products over the same blocks: dA_e = dY_e B_e^T, and dB_e = A_e^T dY_e,
    which ``torch._grouped_mm`` computes from two 2-D operands split along M by offs."""
    grad = grad.contiguous()  # (M, N)
    grad_a = torch._grouped_mm(grad, b.transpose(-2, -1), offs=offs)  # (M, K)
    grad_b = torch._grouped_mm(a.transpose(0, 1), grad, offs=offs)  # (E, K, N)
    return grad_a.contiguous(), grad_b.contiguous()


@grouped_mm_backward.register_fake
def _grouped_mm_backward_fake(grad, a, b, offs):
    return a.new_empty(a.shape), b.new_empty(b.shape)  # contiguous, as the eager body


def _setup_context(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad_a, grad_b = grouped_mm_backward(grad, a, b, offs)
    return grad_a, grad_b, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
