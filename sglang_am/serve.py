"""Launch an SGLang 0.5.23 server in one command: ``python -m sglang_am.serve [--model-path M] [sglang flags]``.

Every flag goes to ``sglang.launch_server`` unchanged, except ``--model NAME``: ``recall`` (the embedded
recall model, the default without ``--model-path``), ``gemma3-270m`` (Gemma-3-270M) or ``smollm2-135m``
(SmolLM2-135M-Instruct), the last two written once as plain transformers directories under
``~/.cache/sglang-am/models``, or ``$SGLANG_AM_MODELS``. It enables
the sglang-am plugin (``SGLANG_AM=1``) and its radix cache (``--radix-cache-backend am``, unless another
backend or ``--disable-radix-cache`` is given), and disables overlap scheduling.
The attention backend follows the device unless ``--attention-backend`` forces one (all three add a
document's bias): ``triton`` on CUDA, ``torch_native`` on CPU; ``flashinfer`` on request. On a machine
without CUDA it also turns on SGLang's CPU engine, puts the ``sgl_kernel`` stand-in on the import
path, adds ``--device cpu`` and a KV pool cap (``--max-total-tokens 65536``) unless given, and has SGLang
fork its processes instead of spawning them (``FORK_VARIABLE``).

Its own flags: ``--am-FIELD VALUE`` sets a field of ``ServerConfig`` (the document store and the bounds on
client work: ``--am-store-dir /data/am``, ``--am-solve-timeout 300``, sizes as ``10GiB``); ``--am-auto``
turns on automatic compaction of reused prefixes, and ``--am-auto-FIELD VALUE`` sets a field of
``AutoPolicy`` (``--am-auto-min-requests 8``). They travel to SGLang's processes as JSON in
``SGLANG_AM_CONFIG`` and ``SGLANG_AM_AUTO``, which also work with ``sglang serve`` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .server.auto import POLICY_VARIABLE, AutoPolicy
from .server.config import CONFIG_VARIABLE, ServerConfig
from .server.cpu import FORK_VARIABLE, bind_rank_threads, cpu_environment, cpu_server_flags, given_flags, has_cuda
from .server.plugin import ENABLE_VARIABLE, RADIX_CACHE_BACKEND

DEFAULT_GPU_ATTENTION_BACKEND = "triton"
# Models served by name (``--model NAME``): the embedded recall model; Gemma-3-270M and SmolLM2-135M-Instruct,
# written out as plain transformers directories from their GGUF packages on first use (``hf.pretrained``).
MODELS = ("recall", "gemma3-270m", "smollm2-135m")
DEFAULT_MODEL = "recall"


def _number(text: str) -> int | float:
    """A slot count (``4096``) or a fraction (``0.25``)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
               "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def _size(text: str) -> int:
    """Bytes: ``1048576``, ``512MiB``, ``10G``."""
    digits = text.rstrip("KMGiBkmgb")
    unit = text[len(digits):].upper()
    if unit not in _SIZE_UNITS or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1048576, 512MiB or 10GiB")
    return int(digits) * _SIZE_UNITS[unit]


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() in ("true", "1", "yes")


def _ratio(text: str) -> float | str:
    """A ratio (``0.2``) or ``auto``."""
    return text if text == "auto" else float(text)


_FIELD_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "float | int": _number, "bool": _boolean,
                "float | str": _ratio}


def am_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sglang_am.serve", add_help=False, allow_abbrev=False,
                                     description="sglang-am flags (every other flag goes to SGLang)")
    def add(flag: str, dest: str, field: dataclasses.Field) -> None:
        parse = _size if field.name.endswith("_bytes") else _FIELD_TYPES[field.type]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        parser.add_argument(flag, dest=dest, type=parse, default=argparse.SUPPRESS, metavar=field.metadata["metavar"],
                            help=f"{field.metadata['help'][0].upper()}{field.metadata['help'][1:]} (default {default}).")

    for field in dataclasses.fields(ServerConfig):
        add(f"--am-{field.name.replace('_', '-')}", f"config.{field.name}", field)
    parser.add_argument("--am-auto", action="store_true",
                        help="Compact radix-tree prefixes that many requests reuse, in the background.")
    for field in dataclasses.fields(AutoPolicy):
        add(f"--am-auto-{field.name.replace('_', '-')}", f"auto.{field.name}", field)
    return parser


def split_am_flags(argv: Sequence[str]) -> tuple[list[str], ServerConfig | None, AutoPolicy | None]:
    """``argv`` without this launcher's ``--am-*`` flags, and the server config and automatic policy they give
    (None where none of their flags is given)."""
    parser = am_parser()
    known, rest = parser.parse_known_args(list(argv))
    given = vars(known)
    config = {name.split(".", 1)[1]: value for name, value in given.items() if name.startswith("config.")}
    auto = {name.split(".", 1)[1]: value for name, value in given.items() if name.startswith("auto.")}
    if auto and not known.am_auto:
        parser.error(f"--am-auto-* flags need --am-auto (got {', '.join(sorted(auto))})")
    try:
        return rest, ServerConfig(**config) if config else None, AutoPolicy(**auto) if known.am_auto else None
    except ValueError as error:
        parser.error(str(error))


def launch_command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``sglang.launch_server`` command line and environment for ``argv``."""
    args, config, policy = split_am_flags(argv)
    args, model = _take_model(args)
    given = given_flags(args)
    if model is not None and "--model-path" in given:
        raise SystemExit("give --model or --model-path, not both")
    if "--model-path" not in given:
        args = ["--model-path", str(model_path(model or DEFAULT_MODEL)), *args]
    if not given & {"--radix-cache-backend", "--disable-radix-cache"}:
        args += ["--radix-cache-backend", RADIX_CACHE_BACKEND]
    if "--disable-overlap-schedule" not in given:  # the documents' side channel is validated without overlap
        args.append("--disable-overlap-schedule")
    if "--attention-backend" not in given and has_cuda():  # on CPU, cpu_server_flags picks torch_native
        args += ["--attention-backend", DEFAULT_GPU_ATTENTION_BACKEND]
    env = {**os.environ, ENABLE_VARIABLE: "1"}
    if config is not None:
        env[CONFIG_VARIABLE] = config.to_json()
    if policy is not None:
        env[POLICY_VARIABLE] = policy.to_json()
    if not has_cuda():
        args, env = cpu_server_flags(args), bind_rank_threads(args, cpu_environment(env))
        env[FORK_VARIABLE] = "1"
    return [sys.executable, "-m", "sglang.launch_server", *args], env


def model_path(name: str) -> Path:
    """The directory of a named model (``MODELS``), written on first use where it is built locally."""
    if name == "recall":
        from .recall_model import default_model_path

        return default_model_path()
    if name == "gemma3-270m":
        from .hf.gemma import gemma3_270m_directory

        return gemma3_270m_directory()
    if name == "smollm2-135m":
        from .hf.smollm2 import smollm2_135m_directory

        return smollm2_135m_directory()
    raise SystemExit(f"--model must be one of {', '.join(MODELS)}, got {name!r}")


def _take_model(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--model NAME`` (or ``--model=NAME``), and NAME."""
    for index, arg in enumerate(argv):
        if arg == "--model":
            if index + 1 == len(argv):
                raise SystemExit(f"--model needs a name: {', '.join(MODELS)}")
            return argv[:index] + argv[index + 2 :], argv[index + 1]
        if arg.startswith("--model="):
            return argv[:index] + argv[index + 1 :], arg.split("=", 1)[1]
    return argv, None


# Ports this launcher picks: below the kernel's ephemeral range (32768 and up on Linux), from which any
# outgoing connection, a starting server's own included, may take a free port before the server binds it.
PORTS_FROM, PORTS_BELOW = 10000, 32768


def free_port() -> int:
    """A loopback port in [``PORTS_FROM``, ``PORTS_BELOW``) that is free now."""
    while True:
        port = random.randrange(PORTS_FROM, PORTS_BELOW)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port


def stock_command(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """SGLang itself, without the plugin (``SGLANG_AM`` unset), with the CPU settings where there is no
    CUDA: the baseline the extension is compared against."""
    args, env = list(argv), {k: v for k, v in os.environ.items() if k != ENABLE_VARIABLE}
    if not has_cuda():
        args, env = cpu_server_flags(args), bind_rank_threads(args, cpu_environment(env))
    return [sys.executable, "-m", "sglang.launch_server", *args], env


class ServerProcess:
    """One server (or router) process group on loopback, its output in a temporary log file (a pipe could fill up)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], url: str):
        self.argv, self.env, self.url = list(argv), dict(env), url
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, startup_seconds: float = 300, ready=None) -> ServerProcess:
        """``launch``, then ``wait_ready``."""
        self.launch()
        return self.wait_ready(startup_seconds, ready)

    def launch(self) -> ServerProcess:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="sglang-server-", suffix=".log")
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, env=self.env)
        return self

    def wait_ready(self, startup_seconds: float = 300, ready=None) -> ServerProcess:
        """Wait until ``ready(url)`` (default: ``healthy``); ``RuntimeError`` with the end of its log (and the
        process stopped) when it exits or is not ready in time."""
        try:
            deadline = time.monotonic() + startup_seconds
            while not (ready or healthy)(self.url):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    state = f"exited with {self.process.returncode}" if self.process.poll() is not None else "is not ready"
                    raise RuntimeError(f"{self.argv[2]} {state}:\n{self.log()[-4000:]}")
                time.sleep(0.25)  # a start takes about 27 s here; a coarser poll adds half its period to each
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()

    def terminate(self) -> None:
        """SIGTERM the whole process group: SGLang's graceful stop begins (``stop`` waits for it)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        """``terminate``, then wait for the group's leader (a kill after 60 s)."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()


def server_process(flags: Sequence[str] = (), env: Mapping[str, str] | None = None, stock: bool = False,
                   port: int | None = None) -> ServerProcess:
    """This launcher (``python -m sglang_am.serve``) with ``flags``, or stock SGLang (``stock_command``; give
    ``--model-path``), on ``port`` (a free one by default) of the loopback; ``env`` is added to the environment."""
    loopback = ["--host", "127.0.0.1", "--port", str(port or free_port())]
    if stock:
        argv, base_env = stock_command([*loopback, *flags])
    else:
        argv, base_env = [sys.executable, "-m", "sglang_am.serve", *loopback, *flags], dict(os.environ)
    return ServerProcess(argv, {**base_env, **(env or {})}, f"http://127.0.0.1:{loopback[-1]}")


@contextlib.contextmanager
def serving(
    flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stock: bool = False,
    startup_seconds: float = 300,
) -> Iterator[str]:
    """A server (``server_process``) for the duration of a ``with`` block; yields its URL. A server that exits or
    stays unhealthy raises ``RuntimeError`` with the end of its log. On exit the whole process group is killed:
    the block's requests are over, the document store survives a kill (``tests/server/test_store.py``), and
    SGLang's graceful stop would spend about 5 s draining nothing."""
    server = server_process(flags, env, stock).start(startup_seconds)
    try:
        yield server.url
    finally:
        server.kill()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(am_parser().format_help(), flush=True)
    command, env = launch_command(sys.argv[1:])
    print("sglang-am:", " ".join(command[2:]), flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
