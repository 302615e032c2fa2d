"""Several sglang-am servers behind SGLang's router (``sglang-router``), in one command.

    python -m sglang_am.cluster --workers 2 [--policy manual] [--port 30000] [server flags ...]

Starts ``--workers`` servers (``python -m sglang_am.serve`` on loopback ports; every other flag goes to each
of them) that share one document store (``--store-dir``) and one admin key, each loading the stored
documents at start-up (``--am-load-store true``), then the router in front of them
(``python -m sglang_router.launch_router --worker-urls ... --policy ...``). It prints the router's URL and
the admin key, and stops everything on Ctrl-C.

Documents are managed through ``ClusterDocuments`` (``sglang_am.client``): registered once on one
worker, saved to the shared store and loaded by the others; dropped from the store first, so a worker
that was down does not bring a dropped document back. With ``--policy manual`` (the default: see
docs/scale-out.md for the measurement) clients send a document's requests with the routing header
``ClusterDocuments.route(doc_id)``, so the router keeps them on one worker; ``cache_aware`` matches the
text it has seen instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .serve import ServerProcess, free_port, server_process
from .server.cpu import THREADS_BIND_VARIABLE, core_shares, has_cuda

POLICIES = ("manual", "cache_aware", "round_robin", "power_of_two", "random")
DEFAULT_POLICY = "manual"
# How the router notices a worker that died: probed every 2 s, dropped from routing after 2 failures, and routed
# to again after one success.
ROUTER_HEALTH_FLAGS = ("--health-check-interval-secs", "2", "--health-failure-threshold", "2",
                       "--health-success-threshold", "1")


class Cluster:
    """N workers sharing ``store_dir`` and ``admin_key``, and the router in front of them. ``stock``: SGLang
    itself as the workers (the baseline; ``flags`` must then name the model). On a machine without CUDA each
    worker gets its own share of the cores, as the ranks of one ``--dp-size`` server do."""

    def __init__(self, workers: int, policy: str, flags: Sequence[str], store_dir: str, admin_key: str,
                 port: int | None = None, env: dict[str, str] | None = None, stock: bool = False):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.store_dir, self.admin_key, self.stock = policy, store_dir, admin_key, stock
        self.flags = list(flags) if stock else [*flags, "--am-store-dir", store_dir, "--am-load-store", "true",
                                                "--admin-api-key", admin_key]
        self.ports = [free_port() for _ in range(workers)]
        cores = [None] * workers if has_cuda() or workers == 1 else core_shares(workers)
        self.envs = [{**(env or {}), **({THREADS_BIND_VARIABLE: share} if share else {})} for share in cores]
        self.workers: list[ServerProcess | None] = [None] * workers
        self.router_port = port or free_port()
        self.router: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def worker_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def _launch_worker(self, index: int) -> ServerProcess:
        self.workers[index] = server_process(self.flags, self.envs[index], self.stock, self.ports[index]).launch()
        return self.workers[index]

    def start_worker(self, index: int, startup_seconds: float = 300) -> None:
        """Start worker ``index`` on its port (again, after ``kill_worker``); it loads the store as it starts."""
        self._launch_worker(index).wait_ready(startup_seconds)

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index``, as a crash would."""
        self.workers[index].kill()
        self.workers[index] = None

    def start(self, startup_seconds: float = 300) -> Cluster:
        """Every worker (started side by side), then the router."""
        for process in [self._launch_worker(index) for index in range(len(self.ports))]:
            process.wait_ready(startup_seconds)
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(self.router_port),
                "--worker-urls", *self.worker_urls, "--policy", self.policy, "--prometheus-port", str(free_port()),
                "--prometheus-host", "127.0.0.1", "--log-level", "warn", *ROUTER_HEALTH_FLAGS]
        self.router = ServerProcess(argv, dict(os.environ), self.url).start(startup_seconds, ready=self._routing)
        return self

    def _routing(self, url: str) -> bool:
        """The router answers and has every live worker."""
        from .client import http_json

        try:
            status, body = http_json("GET", f"{url}/workers", timeout=5)
        except OSError:
            return False
        return status == 200 and len(body.get("workers", [])) == sum(w is not None for w in self.workers)

    def stop(self) -> None:
        """Every process's graceful stop at once: each takes about 5 s (SGLang's watchdog), mostly waiting."""
        running = [process for process in [self.router, *self.workers] if process is not None]
        for process in running:
            process.terminate()
        for process in running:
            process.stop()


@contextlib.contextmanager
def cluster(workers: int = 2, policy: str = DEFAULT_POLICY, flags: Sequence[str] = (), store_dir: str | None = None,
            admin_key: str | None = None, env: dict[str, str] | None = None, stock: bool = False) -> Iterator[Cluster]:
    """A ``Cluster`` for a ``with`` block (a temporary store and a random admin key unless given)."""
    with tempfile.TemporaryDirectory(prefix="sglang-am-cluster-") as scratch:
        running = Cluster(workers, policy, flags, store_dir or str(Path(scratch) / "store"),
                          admin_key or secrets.token_hex(16), env=env, stock=stock)
        try:
            yield running.start()
        finally:
            running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_am.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="servers behind the router")
    parser.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY, help="the router's routing policy")
    parser.add_argument("--port", type=int, default=30000, help="the router's port (loopback)")
    parser.add_argument("--store-dir", help="the shared document store (default: the servers' default store)")
    parser.add_argument("--admin-api-key", help="the workers' admin key (default: a random one, printed)")
    args, flags = parser.parse_known_args()
    from .server.config import default_store_dir

    running = Cluster(args.workers, args.policy, flags, args.store_dir or default_store_dir(),
                      args.admin_api_key or secrets.token_hex(16), port=args.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        running.start()
        print(f"sglang-am cluster: router {running.url} ({args.policy}), workers {' '.join(running.worker_urls)}, "
              f"admin key {running.admin_key}, store {running.store_dir}", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()


if __name__ == "__main__":
    main()
