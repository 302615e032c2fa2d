"""What SGLang 0.5.23 needs to serve on a machine without CUDA (see the project's CPU notes).

``cpu_environment`` turns on SGLang's CPU engine and puts the ``sgl_kernel`` stand-in first on the
import path; ``cpu_server_flags`` adds the flags a CPU server needs unless the user already gave them;
``bind_rank_threads`` gives each of several ranks (``--dp-size``, ``--tp-size``) its own cores.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shims"
# SGLang sizes the KV pool from free memory (15 GB even for a tiny model on a 24 GB machine): cap it.
DEFAULT_CPU_MAX_TOTAL_TOKENS = 65536
CPU_DEFAULT_FLAGS: tuple[tuple[str, str | None], ...] = (  # (flag, value); None: a switch
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--max-total-tokens", str(DEFAULT_CPU_MAX_TOTAL_TOKENS)),
    # An idle scheduler otherwise spins, and the solver thread in its process waits for the GIL: a
    # 512-token registration's solve took 0.48 s spinning, 0.06 s sleeping.
    ("--sleep-on-idle", None),
)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` plus ``SGLANG_USE_CPU_ENGINE=1`` and the stand-in on ``PYTHONPATH`` (inherited by
    SGLang's spawned scheduler and detokenizer processes)."""
    env = dict(environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != SHIM_DIR]
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR), *paths])
    return env


THREADS_BIND_VARIABLE = "SGLANG_CPU_OMP_THREADS_BIND"
# Set by the launcher where there is no CUDA: the plugin then has SGLang fork its scheduler and detokenizer
# processes instead of spawning them. Spawn keeps a parent's CUDA state out of a child; without CUDA it only
# makes each child import SGLang again, 12 of a server start's 31 s here (``fork_subprocesses``).
FORK_VARIABLE = "SGLANG_AM_FORK_SUBPROCESSES"


def fork_subprocesses(result, *args, **kwargs):
    """After SGLang's ``_set_envs_and_config`` chose ``spawn``: ``fork`` instead (see ``FORK_VARIABLE``)."""
    multiprocessing.set_start_method("fork", force=True)
    return result


def _flag_value(argv: Sequence[str], names: tuple[str, ...], default: str) -> str:
    for index, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in names:
            return value or (argv[index + 1] if index + 1 < len(argv) else default)
    return default


def core_shares(parts: int) -> list[str]:
    """This process's cores split evenly into ``parts`` lists (``"0,1"``), in SGLang's binding syntax."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < parts:
        raise SystemExit(f"{parts} ranks or servers need at least {parts} CPU cores; this machine gives {len(cores)}")
    share = len(cores) // parts
    return [",".join(map(str, cores[r * share:(r + 1) * share])) for r in range(parts)]


def bind_rank_threads(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with ``SGLANG_CPU_OMP_THREADS_BIND`` splitting this process's cores evenly over the ranks
    (data-parallel times tensor-parallel) when there are several: SGLang's CPU engine otherwise binds one rank
    per NUMA node and refuses more ranks than nodes. A value the user set is kept."""
    env = dict(environ)
    ranks = int(_flag_value(argv, ("--dp-size", "--dp"), "1")) * int(_flag_value(argv, ("--tp-size", "--tp"), "1"))
    if ranks > 1 and THREADS_BIND_VARIABLE not in env:
        env[THREADS_BIND_VARIABLE] = "|".join(core_shares(ranks))
    return env


def given_flags(argv: Sequence[str]) -> set[str]:
    """The ``--flag`` names in ``argv`` (written ``--flag value`` or ``--flag=value``)."""
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}


def cpu_server_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` plus the CPU defaults it does not set."""
    given = given_flags(argv)
    if "--mem-fraction-static" in given:  # the user sized the pool another way
        given.add("--max-total-tokens")
    extra = [part for flag, value in CPU_DEFAULT_FLAGS if flag not in given for part in (flag, value) if part is not None]
    return [*argv, *extra]
