"""Launch an SGLang 0.5.23 server in one command: ``python -m sglang_am.serve [--model-path M] [sglang flags]``.

Every flag goes to ``sglang.launch_server`` unchanged. Without ``--model-path`` it serves the embedded
recall model. It enables the sglang-am plugin (``SGLANG_AM=1``) and its radix cache (``--radix-cache-backend
am``, unless another backend or ``--disable-radix-cache`` is given). On a machine without CUDA it also turns on SGLang's CPU engine, puts the ``sgl_kernel``
stand-in on the import path, and adds ``--device cpu --attention-backend torch_native`` and a KV pool cap
(``--max-total-tokens 65536``) unless given.
"""

from __future__ import annotations

import os
import sys

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
    env = {**os.environ, ENABLE_VARIABLE: "1"}
    if not has_cuda():
        args, env = cpu_server_flags(args), cpu_environment(env)
    return [sys.executable, "-m", "sglang.launch_server", *args], env


def main() -> None:
    command, env = launch_command(sys.argv[1:])
    print("sglang-am:", " ".join(command[2:]), flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
