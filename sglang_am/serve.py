"""Launch an SGLang 0.5.23 server in one command: ``python -m sglang_am.serve [--model-path M] [sglang flags]``.

Every flag goes to ``sglang.launch_server`` unchanged. Without ``--model-path`` it serves the embedded
recall model. It enables the sglang-am plugin (``SGLANG_AM=1``) and its radix cache (``--radix-cache-backend
am``, unless another backend or ``--disable-radix-cache`` is given), selects the bias-aware
``torch_native`` attention backend unless another is given, and disables overlap scheduling. On a
machine without CUDA it also turns on SGLang's CPU engine, puts the ``sgl_kernel`` stand-in on the
import path, and adds ``--device cpu`` and a KV pool cap (``--max-total-tokens 65536``) unless given.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence

from .server.cpu import cpu_environment, cpu_server_flags, given_flags, has_cuda
from .server.plugin import ENABLE_VARIABLE, RADIX_CACHE_BACKEND


def launch_command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``sglang.launch_server`` command line and environment for ``argv``."""
    args, given = list(argv), given_flags(argv)
    if "--model-path" not in given:
        from .recall_model import default_model_path

        args = ["--model-path", str(default_model_path()), *args]
    if not given & {"--radix-cache-backend", "--disable-radix-cache"}:
        args += ["--radix-cache-backend", RADIX_CACHE_BACKEND]
    if "--disable-overlap-schedule" not in given:  # the documents' side channel is validated without overlap
        args.append("--disable-overlap-schedule")
    if "--attention-backend" not in given:  # the bias-aware backend, on GPU too until the Triton one lands
        args += ["--attention-backend", "torch_native"]
    env = {**os.environ, ENABLE_VARIABLE: "1"}
    if not has_cuda():
        args, env = cpu_server_flags(args), cpu_environment(env)
    return [sys.executable, "-m", "sglang.launch_server", *args], env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stock_command(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """SGLang itself, without the plugin (``SGLANG_AM`` unset), with the CPU settings where there is no
    CUDA: the baseline the extension is compared against."""
    args, env = list(argv), {k: v for k, v in os.environ.items() if k != ENABLE_VARIABLE}
    if not has_cuda():
        args, env = cpu_server_flags(args), cpu_environment(env)
    return [sys.executable, "-m", "sglang.launch_server", *args], env


@contextlib.contextmanager
def serving(
    flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stock: bool = False,
    startup_seconds: float = 300,
) -> Iterator[str]:
    """A server on a free loopback port for the duration of a ``with`` block; yields its URL.

    This launcher (``python -m sglang_am.serve``) with ``flags``, or stock SGLang (``stock_command``; give
    ``--model-path``); ``env`` is added to the environment. The whole process group is stopped on exit.
    A server that exits or stays unhealthy raises ``RuntimeError`` with the end of its log."""
    loopback = ["--host", "127.0.0.1", "--port", str(free_port())]
    if stock:
        argv, base_env = stock_command([*loopback, *flags])
    else:
        argv, base_env = [sys.executable, "-m", "sglang_am.serve", *loopback, *flags], dict(os.environ)
    url = f"http://127.0.0.1:{loopback[-1]}"
    with tempfile.NamedTemporaryFile("w+", prefix="sglang-server-", suffix=".log") as log:  # a pipe could fill up
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                   env={**base_env, **(env or {})})
        try:
            deadline = time.monotonic() + startup_seconds
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    state = f"exited with {process.returncode}" if process.poll() is not None else "is not healthy"
                    raise RuntimeError(f"server {state}:\n{log.read()[-4000:]}")
                time.sleep(2)
            yield url
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except ProcessLookupError:  # already gone
        process.wait()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> None:
    command, env = launch_command(sys.argv[1:])
    print("sglang-am:", " ".join(command[2:]), flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
