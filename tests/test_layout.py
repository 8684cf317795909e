"""The source layout: no folder of ours hides an installed distribution, and the package list is complete.

transformers imports Hugging Face's ``kernels`` distribution while it loads a model. A folder named
``kernels`` (or ``stores``, ``integrations``) importable from the repository root would be found first
whenever the root is on ``sys.path`` (``python -m ...`` started there puts it first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run with the repository root as the working directory *and* first on sys.path, as `python -m` does
BUILD_TINY_MODEL = """
import os
import sys
import warnings
sys.path.insert(0, {root!r})
import transformers.integrations.hub_kernels  # imports the `kernels` distribution where installed
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
model = LlamaForCausalLM(config)
ours = [os.path.join({root!r}, *parts) for parts in (("src",), ("kernels",), ("stores",), ("integrations",))]
for name in ("kernels", "stores", "integrations"):
    try:
        module = __import__(name)
    except ImportError:
        continue
    where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))[0]
    assert not any(str(where).startswith(p) for p in ours), f"{{name}} resolved to our folder: {{where}}"
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


@pytest.mark.parametrize(("category", "module", "message"), [
    (DeprecationWarning, "agentspec.engine.forward", "x is deprecated"),
    (FutureWarning, "agentspec", "y will change"),
    (FutureWarning, "transformers.generation.utils", "z is deprecated"),
    # transformers' deprecated keyword arguments point at torch's module dispatch, not at the caller
    (FutureWarning, "torch.nn.modules.module", "`past_key_values` is deprecated and will be removed in version 5.40.0"),
])
def test_deprecations_that_concern_us_are_errors(category, module, message):
    """pyproject's filterwarnings turns them into errors, so a deprecated call of ours fails the suite."""
    with pytest.raises(category):
        warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)


def test_other_libraries_deprecations_stay_warnings():
    with pytest.warns(DeprecationWarning):
        warnings.warn_explicit("old", DeprecationWarning, filename="somelib.py", lineno=1, module="somelib")
