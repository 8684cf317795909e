"""Shared fixtures: a tiny random Llama for mechanics, the real default model for integration.

The whole test session runs with ``AGENTSPEC_HOME`` in a temporary folder, so no test reads or
writes the user's session store (``cache.db``). The converted default model, a pure function of
its GGUF file, is shared with the real home (``models/``) and its measured cost curves are copied
from it, so neither is made again for every run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")

_REAL_HOME = Path(os.environ.get("AGENTSPEC_HOME", Path.home() / ".cache" / "agentspec")).expanduser()
_TEST_HOME = Path(tempfile.mkdtemp(prefix="agentspec-test-home-"))
(_REAL_HOME / "models").mkdir(parents=True, exist_ok=True)
(_TEST_HOME / "models").symlink_to(_REAL_HOME / "models", target_is_directory=True)
if (_REAL_HOME / "cost_curves").is_dir():
    shutil.copytree(_REAL_HOME / "cost_curves", _TEST_HOME / "cost_curves")
os.environ["AGENTSPEC_HOME"] = str(_TEST_HOME)  # before any test imports agentspec: subprocesses inherit it


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_TEST_HOME, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test on the real default model must say so (``@pytest.mark.model``), so that the fast suite
    (``-m "not model"``) never loads it: one that does not fails here, before the model loads."""
    if "default_engine" in getattr(item, "fixturenames", ()) and item.get_closest_marker("model") is None:
        pytest.fail(f"{item.nodeid} uses the real default model (default_engine) but is not marked "
                    "@pytest.mark.model", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny randomly initialised Llama (fp32, eval mode, SDPA) with a 512-token vocab."""
    from doubles import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct), from the local cache."""
    from agentspec.engine.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def default_engine():
    """One Engine on the real default model, shared by the integration tests."""
    from agentspec.engine import Engine

    return Engine.from_pretrained()
