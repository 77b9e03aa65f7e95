"""The one kernel switch: ``ModelConfig.kernels = "reference" | "triton"``.

How it works
------------
The reference modules (``minimoe.norm.RMSNorm``, ``minimoe.rope.apply_rotary``, ...) stay
plain PyTorch. At the top of their forward they ask this module "is there a Triton kernel
to use for this tensor?" (``rmsnorm_kernel(x)``, ``rotary_kernel(x)``); the answer is a
function from ``minimoe.kernels`` or None, and None means "run the PyTorch code below".

Which answer they get depends on the *current choice*, a context variable that
``Transformer.forward`` and ``DecoderLayer.forward`` set from their ``kernels`` attribute,
copied from the config when they are built (the ``@follows_config_kernels`` decorator
below; to change a built model, set ``model.kernels`` and each ``layer.kernels``). The decoder layer sets it too so that
activation checkpointing, which re-runs a layer during the backward pass outside the
model's forward, recomputes with the same kernels. You can also set it by hand around
any piece of code, e.g. a standalone attention module::

    with kernel_switch.use_kernels("triton"):
        y = attention(x, positions)

Which kernels exist so far: RMSNorm (``minimoe.kernels.rmsnorm``), the rotate-half
rotary embedding (``minimoe.kernels.rope``) and the router's logits -> (top-k experts,
gate weights, scores) step (``minimoe.kernels.moe_router``, asked by ``router_kernel``),
and for FP8 layers (``minimoe.fp8``) the 1x128 activation quantiser and the block-scaled FP8
GEMM (``minimoe.kernels.fp8_quant``, ``fp8_gemm``; ``fp8_act_quant_kernel``,
``fp8_gemm_kernel``), and the routed experts of an MoE layer as aligned grouped GEMMs with
the gather, SwiGLU and routing weight fused (``minimoe.kernels.fused_moe``, asked by
``fused_moe_kernel`` in ``minimoe.moe.dispatch_sorted``); everything else runs its reference
code whatever the choice.

When "triton" cannot run
------------------------
Triton compiles for GPUs. With ``kernels="triton"`` on a machine without CUDA (or with the
tensors on the CPU, or without the triton package) the switch warns once, naming the
reason, and the reference path runs: the numbers are the same, only the speed differs.

The exception is Triton's interpreter: with the environment variable ``TRITON_INTERPRET=1``
the kernels run on CPU tensors, executed op by op by numpy. It is slow (use small
shapes), but it lets a reader without a GPU step through a kernel, and it is how the
tests check the kernels on CPU-only CI. Triton reads the variable when ``@triton.jit``
decorates a function, i.e. when the kernel module is *imported*; set it before starting
Python (``TRITON_INTERPRET=1 python ...``) or at least before anything imports triton.
The choice is then fixed for the whole process: triton.language's own helpers (``tl.sum``,
...) are built for one mode at import, and GPU and interpreted functions do not mix. So
the switch asks triton how it was imported (``triton_interpreted``), not the variable's
current value, and each kernel module records its own mode in ``INTERPRETED``.

Dependency direction: this module imports ``minimoe.kernels`` lazily, only when the
choice is "triton", so importing minimoe never needs triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from typing import Callable, Iterator, Optional

import torch

KERNEL_CHOICES = ("reference", "triton")

_choice: contextvars.ContextVar[str] = contextvars.ContextVar("minimoe_kernels", default="reference")
_warned: set[str] = set()  # reasons already explained (each is warned about once per process)


def current_kernels() -> str:
    """The choice in effect here: "reference" or "triton"."""
    return _choice.get()


@contextlib.contextmanager
def use_kernels(choice: str) -> Iterator[None]:
    """Run the enclosed code with ``choice`` ("reference" | "triton") as the kernel choice."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    token = _choice.set(choice)
    try:
        yield
    finally:
        _choice.reset(token)


def follows_config_kernels(forward: Callable) -> Callable:
    """Decorator for a module's forward: run it under the module's ``self.kernels`` choice."""

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced code takes the reference path (see _kernel)
            return forward(self, *args, **kwargs)
        with use_kernels(self.kernels):
            return forward(self, *args, **kwargs)

    return wrapped


def triton_interpreted() -> bool:
    """Whether this process's triton runs kernels through the interpreter.

    Decided once, when triton is first imported: ``triton.language``'s own helpers
    (``tl.sum``, ...) are ``@triton.jit`` functions built for the GPU or for the
    interpreter according to TRITON_INTERPRET at that moment, and the two kinds do not mix.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


def _why_not_triton(x: torch.Tensor) -> Optional[str]:
    """None when the Triton kernels can run on x here, else the reason they cannot."""
    try:
        import triton  # noqa: F401  (only: is it installed?)
    except ImportError:
        return "the triton package is not installed"
    if triton_interpreted():
        return None  # the interpreter runs the kernels on CPU tensors
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ("TRITON_INTERPRET was set after triton had been imported (triton reads it at "
                "import: set it before starting Python)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    if x.device.type != "cuda":
        return f"the tensors are on {x.device}, not on a CUDA device"
    return None


def kernel_module(name: str):
    """Import minimoe.kernels.<name>, checking it was built for the same mode as triton itself."""
    module = importlib.import_module(f"minimoe.kernels.{name}")
    if module.INTERPRETED != triton_interpreted():
        raise RuntimeError(
            f"minimoe.kernels.{name} was imported with TRITON_INTERPRET "
            f"{'set' if module.INTERPRETED else 'unset'}, but triton itself with it "
            f"{'set' if triton_interpreted() else 'unset'}: set TRITON_INTERPRET before "
            "starting Python, not in between")
    return module


def _kernel(x: torch.Tensor, module_name: str, function_name: str) -> Optional[Callable]:
    # Under torch.compile the reference PyTorch code is what gets traced: Inductor writes its
    # own fused kernels from it (and a context variable cannot be read inside a graph).
    if torch.compiler.is_compiling() or _choice.get() != "triton":
        return None
    reason = _why_not_triton(x)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"kernels='triton' was chosen but {reason}; running the reference PyTorch path "
                "instead (same numbers, PyTorch speed). To run the Triton kernels on the CPU "
                "through Triton's interpreter (slow; for tests and reading), set "
                "TRITON_INTERPRET=1 before starting Python.",
                RuntimeWarning,
                stacklevel=4,
            )
        return None
    return getattr(kernel_module(module_name), function_name)


def rmsnorm_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``minimoe.kernels.rmsnorm.rms_norm`` if the current choice runs it on x, else None."""
    return _kernel(x, "rmsnorm", "rms_norm")


def rotary_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``minimoe.kernels.rope.apply_rotary`` if the current choice runs it on x, else None."""
    return _kernel(x, "rope", "apply_rotary")


def router_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``minimoe.kernels.moe_router.route`` if the current choice runs it on x, else None."""
    return _kernel(x, "moe_router", "route")


def fp8_act_quant_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``minimoe.kernels.fp8_quant.act_quant`` if the current choice runs it on x, else None."""
    return _kernel(x, "fp8_quant", "act_quant")


def fp8_gemm_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``minimoe.kernels.fp8_gemm.fp8_gemm`` if the current choice runs it on x, else None."""
    return _kernel(x, "fp8_gemm", "fp8_gemm")


def fused_moe_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``minimoe.kernels.fused_moe.fused_moe`` if the current choice runs it on x, else None."""
    return _kernel(x, "fused_moe", "fused_moe")
