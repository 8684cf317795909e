"""Builds the optional compiled parts: the suffix-tree core (agentspec.draft._suffix_core) and the
GGUF-block CPU matmul (agentspec.kernels._blockq).

All metadata lives in pyproject.toml. If a C++ build fails (no compiler, no Python headers),
installation goes on without it: agentspec falls back to the pure-Python suffix tree and to
fp32 linear layers.
"""

from __future__ import annotations

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 is a build requirement; without it, skip the extension
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Build extensions, but only warn when the compiled core cannot be built."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001
            print(f"warning: agentspec extensions not built ({exc}); using the Python fallbacks", file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: could not build {ext.name} ({exc}); using its Python fallback", file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension(
            "agentspec.draft._suffix_core",
            ["agentspec/draft/_suffix_core.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )
    ext_modules.append(
        Pybind11Extension(
            "agentspec.kernels._blockq",
            ["kernels/_blockq.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp"],  # AVX2/FMA per function, chosen at run time
            extra_link_args=["-fopenmp"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
