"""Ahead-of-time compilation of the Triton kernels for an H100 (sm_90), without a GPU.

Triton ships ptxas, so a kernel can be compiled to sm_90 machine code on a CPU-only machine:
that catches what the interpreter cannot (unsupported ops or dtypes on the GPU, register
spills, type errors in code paths the interpreter never specialises). The compilation runs in
a subprocess because the test modules import triton with TRITON_INTERPRET=1, and a process's
triton is either interpreted or compiled, never both.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_kernel(kernel, signature, constants, num_warps=4, num_stages=3):
        names = kernel.arg_names  # the kernel's own parameter order
        signature = dict(signature, **{name: "constexpr" for name in constants})
        assert sorted(signature) == sorted(names), (kernel.__name__, sorted(signature))
        source = ASTSource(kernel, {name: signature[name] for name in names},
                           constexprs={(names.index(n),): v for n, v in constants.items()})
        triton.compile(source, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
""")


def compile_for_h100(body: str) -> None:
    """Run PRELUDE + body (calls of compile_kernel) in a fresh interpreter-free process.

    Skips only when triton itself is not installed. Any other failure of the subprocess (a
    kernel module that no longer imports, a missing ptxas in a triton that should ship one, a
    compile error) fails the test with the subprocess's stderr.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset
    script = PRELUDE + textwrap.dedent(body) + "\nprint('compiled')\n"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("compiled")
