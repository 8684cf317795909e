"""Builds the optional compiled suffix-tree core (agentspec.draft._suffix_core).

All metadata lives in pyproject.toml. If the C++ build fails (no compiler, no Python
headers), installation goes on without it and agentspec falls back to the pure-Python twin.
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
            print(f"warning: agentspec compiled suffix tree not built ({exc}); using the Python twin", file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: could not build {ext.name} ({exc}); using the Python twin", file=sys.stderr)


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

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
