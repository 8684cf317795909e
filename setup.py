"""The package layout and the compiled parts of agentspec; all other metadata lives in pyproject.toml.

The source tree is a ``src`` layout: ``src/agentspec`` is the core and ``src/stores``, ``src/kernels`` and
``src/integrations`` are installed as ``agentspec.stores``, ``agentspec.kernels`` and ``agentspec.integrations``
(CONTRIBUTING.md says why). The package list is derived from the folders (every folder with an ``__init__.py``),
never kept by hand; data folders (``agentspec/samples``) count as packages.

* ``agentspec.draft._suffix_core`` -- the drafting core (suffix trees and the scorer). **Required**:
  it has no second implementation in the package, so when it cannot be built (no C++17 compiler, no
  Python headers) the install fails with the compiler's message.
* ``agentspec.kernels._blockq`` -- the GGUF-block CPU matmul. **Optional** (setuptools' ``optional``
  extension): without it, quantized models run their linear layers on the stock fp32 path (same
  outputs, slower), so a failed build only prints a warning and the install goes on.
* ``agentspec.kernels._attn`` -- tree attention over fp32/fp16/bf16 KV (AVX-512 or AVX2). **Optional**:
  without it (or on a CPU without AVX2) attention runs through torch's fused kernel, and 16-bit KV is
  widened to fp32 before it.
"""

from __future__ import annotations

from pybind11.setup_helpers import Pybind11Extension  # a build requirement (pyproject.toml)
from setuptools import find_namespace_packages, setup

# import name -> folder; each folder's sub-packages are found below it
PACKAGE_ROOTS = {
    "agentspec": "src/agentspec",
    "agentspec.stores": "src/stores",
    "agentspec.kernels": "src/kernels",
    "agentspec.integrations": "src/integrations",
}

def _packages(root: str, folder: str) -> list[str]:
    """``root`` and every folder below ``folder`` (data folders such as ``samples`` too), as import names."""
    return [root, *(f"{root}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"]))]


PACKAGES = [name for root, folder in PACKAGE_ROOTS.items() for name in _packages(root, folder)]

ext_modules = [
    Pybind11Extension(
        "agentspec.draft._suffix_core",
        ["src/agentspec/draft/_suffix_core.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    Pybind11Extension(
        "agentspec.kernels._blockq",
        ["src/kernels/_blockq.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp"],  # AVX2/FMA per function, chosen at run time
        extra_link_args=["-fopenmp"],
        optional=True,
    ),
    Pybind11Extension(
        "agentspec.kernels._attn",
        ["src/kernels/_attn.cpp"],
        cxx_std=17,
        # AVX-512 or AVX2 per function, chosen at run time; no fused multiply-adds but the written ones
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
        optional=True,
    ),
]

setup(ext_modules=ext_modules, package_dir=PACKAGE_ROOTS, packages=PACKAGES)
