"""What every benchmark records next to its numbers (the machine, the versions and the inputs) and how it
leaves them behind."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import psutil
import torch
from matplotlib.figure import Figure

from sglang_am.server.errors import DocumentError

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def register_or_refused(client, ratio: float, **fields) -> dict | None:
    """A registration through ``client`` (``sglang_am.client.DocumentsClient``); None where the control (ratio 1.0:
    full documents pinned) finds no room in the pool (503): that document is served by the radix cache, as a
    user's would be. Any other refusal is an error of the benchmark."""
    try:
        return client.register(ratio=ratio, **fields)
    except DocumentError as error:
        if error.status != 503 or ratio != 1.0:
            raise
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": sys.version.split()[0],
            **{name: _version(name) for name in ("torch", "numpy", "sglang", "sglang-am", "triton", "flashinfer-python")},
        },
        "git_commit": _git_commit(),
    }


def finish(payload: dict, output: Path, plot: Callable[[dict], Figure] | None = None) -> None:
    """Every benchmark's last step, so they all leave results alike: ``payload`` (environment() included) as
    JSON at ``output``, the figure ``plot`` draws from it as the PNG beside it, and a line saying where."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    if plot is None:
        print(f"wrote {output}")
        return
    figure = plot(payload)
    figure.tight_layout()
    image = output.with_suffix(".png")
    figure.savefig(image, dpi=120)  # a bare Figure renders with Agg: no pyplot backend, nothing to close
    print(f"wrote {output} and {image}")


class PeakMemory:
    """Resident memory of a process and its children around a ``with`` block: ``baseline`` at entry and
    ``peak``, sampled every ``interval`` seconds by a thread (and once more at exit), in bytes."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.root, self.interval = psutil.Process(pid), interval
        self.baseline = self.peak = 0
        self._running, self._thread = False, None

    def rss(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def __enter__(self) -> PeakMemory:
        self.baseline = self.peak = self.rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self.rss())
