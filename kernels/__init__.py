"""minimoe.kernels: the fast path -- Triton kernels, each beside the minimoe function it replaces.

This folder is installed as the package ``minimoe.kernels`` (pyproject.toml maps it with
setuptools' package-dir; a top-level ``kernels`` name would collide with an existing PyPI
distribution). It depends on torch and triton only; minimoe imports a kernel lazily, at
the project's one kernel switch (``ModelConfig.kernels = "triton"``), so importing minimoe
never needs triton.
"""
