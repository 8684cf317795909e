"""The source layout: no folder of ours hides an installed distribution, and the package list is complete.

transformers imports Hugging Face's ``kernels`` distribution while it loads a model. A folder named
``kernels`` (or ``stores``, ``integrations``) importable from the repository root would be found first
whenever the root is on ``sys.path`` (``python -m ...`` started there puts it first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# run with the repository root as the working directory *and* first on sys.path, as `python -m` does
BUILD_TINY_MODEL = """
import sys
sys.path.insert(0, {root!r})
import transformers.integrations.hub_kernels  # imports the `kernels` distribution where installed
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = LlamaForCausalLM(config)
for name in ("kernels", "stores", "integrations"):
    try:
        module = __import__(name)
    except ImportError:
        continue
    where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
    assert not str(where).startswith({root!r}), f"{{name}} resolved inside the checkout: {{where}}"
print("ok", type(model).__name__)
"""


def test_repository_root_hides_no_distribution():
    code = BUILD_TINY_MODEL.format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok LlamaForCausalLM"


def test_no_top_level_package_in_the_root():
    """Only ``src/`` holds importable packages: nothing at the root claims a top-level import name."""
    claimed = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert claimed == []
