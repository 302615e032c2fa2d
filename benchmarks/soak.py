"""Soak test: one extension server with automatic compaction and a small KV pool, under mixed traffic.

Bounded by --minutes and --max-requests, loopback only. Workers pick operations at random: questions
on documents that automatic compaction picks up, unrelated prompts of random length (eviction
pressure on the --max-total-tokens pool), explicit register/drop of churn documents, questions on
those, streaming requests whose client disconnects after the first chunk, and requests aborted
through /abort_request. Every --quiet-every seconds the workers pause; once the scheduler is idle,
SGLang's pool invariant is checked through /am/stats (the server also runs SGLang's strict idle
memory and tree checks, which stop it on a leak) and a registered sentinel document must give the
same greedy tokens as at the start. Intended refusals (409 for a document in use or still being
registered, 404 for one already dropped, 503 for a full pool) are counted, not failures.

    python benchmarks/soak.py --minutes 10         # the closing-note run
    python benchmarks/soak.py --minutes 2          # what CI runs (tests/test_project.py)

Writes benchmarks/results/soak.json (counts, failures, quiet points, the server's /am/stats);
exits 1 on any unexpected failure, leak or sentinel mismatch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from common import RESULTS_DIR, environment, write_json
from sglang_am.client import http_json
from sglang_am.recall_model import recall_task
from sglang_am.serve import serving

OPERATIONS = {"ask_auto": 0.4, "filler": 0.15, "register": 0.07, "drop": 0.07, "ask_churn": 0.07,
              "disconnect": 0.12, "abort": 0.12}
INTENDED = {"register": {503}, "drop": {404, 409}}  # refusals that are part of the contract
WORDS = [f"w{i}" for i in range(200)]


class Soak:
    def __init__(self, url: str, args):
        self.url, self.args = url, args
        self.rng = random.Random(args.seed)
        self.auto_docs = [recall_task(num_pairs=self.rng.randint(70, 140), num_questions=8, seed=100 + i)[0] for i in range(6)]
        self.churn_docs = [recall_task(num_pairs=60, num_questions=4, seed=200 + i)[0] for i in range(3)]
        self.sentinel = recall_task(num_pairs=100, num_questions=4, seed=300)[0]
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.quiet_points: list[dict] = []
        self.lock = threading.Lock()
        self.running = threading.Event()  # cleared at quiet points
        self.busy = 0
        self.requests = 0

    # ----- operations (each returns its outcome: "ok", "refused", "aborted", or raises) -----

    def generate(self, text: str, max_new_tokens: int, ignore_eos: bool = False, **extra) -> dict:
        params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": ignore_eos}
        status, body = http_json("POST", f"{self.url}/generate", {"text": text, "sampling_params": params, **extra}, timeout=300)
        assert status == 200, f"generate: {status} {str(body)[:300]}"
        return body

    def ask(self, doc, rng) -> str:
        question = rng.choice(doc.questions).question
        body = self.generate(f"{doc.text}\n{question}", 4)
        assert body["meta_info"]["finish_reason"]["type"] in ("length", "stop"), body["meta_info"]["finish_reason"]
        return "ok"

    def op_ask_auto(self, rng):
        return self.ask(rng.choice(self.auto_docs), rng)

    def op_ask_churn(self, rng):
        return self.ask(rng.choice(self.churn_docs), rng)

    def op_filler(self, rng):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 600)))
        self.generate(text, rng.randint(8, 32))
        return "ok"

    def op_register(self, rng):
        doc = rng.choice(self.churn_docs)
        status, body = http_json("POST", f"{self.url}/am/documents", {"text": doc.text, "ratio": 0.1}, timeout=300)
        return self.judge("register", status, body)

    def op_drop(self, rng):
        status, listed = http_json("GET", f"{self.url}/am/documents")
        assert status == 200, listed
        ids = [d["doc_id"] for d in listed["documents"] if d["origin"] == "explicit" and d["doc_id"] != self.sentinel_id]
        doc_id = rng.choice(ids) if ids else "0" * 16
        status, body = http_json("DELETE", f"{self.url}/am/documents/{doc_id}")
        return self.judge("drop", status, body)

    def op_disconnect(self, rng):
        doc = rng.choice(self.auto_docs)
        target = urlparse(self.url)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
        payload = {"text": f"{doc.text}\n{doc.questions[0].question}", "stream": True,
                   "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}
        connection.request("POST", "/generate", json.dumps(payload), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.status
        response.readline()  # the first chunk, then the client goes away
        connection.close()
        return "ok"

    def op_abort(self, rng):
        rid = uuid.uuid4().hex
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 300)))
        result = {}

        def run():
            result["body"] = self.generate(text, 200, ignore_eos=True, rid=rid)

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(rng.uniform(0.05, 0.5))
        status, body = http_json("POST", f"{self.url}/abort_request", {"rid": rid})
        assert status == 200, f"abort_request: {status} {body}"
        thread.join(timeout=300)
        assert "body" in result, "the aborted request did not answer"
        return "aborted" if result["body"]["meta_info"]["finish_reason"]["type"] == "abort" else "ok"

    @staticmethod
    def judge(operation: str, status: int, body) -> str:
        if status == 200:
            return "ok"
        assert status in INTENDED[operation], f"{operation}: {status} {str(body)[:300]}"
        return "refused"

    # ----- driver -----

    def sentinel_answers(self) -> list[list[int]]:
        return [self.generate(f"{self.sentinel.text}\n{q.question}", 4)["output_ids"] for q in self.sentinel.questions]

    def worker(self, index: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        names, weights = zip(*OPERATIONS.items())
        while time.monotonic() < deadline:
            self.running.wait()
            with self.lock:
                if self.requests >= self.args.max_requests:
                    return
                self.requests += 1
                self.busy += 1
            name = rng.choices(names, weights)[0]
            try:
                outcome = getattr(self, f"op_{name}")(rng)
            except Exception as error:  # noqa: BLE001 - every unexpected outcome is a recorded failure
                outcome = "failed"
                with self.lock:
                    self.failures.append(f"{name}: {error!r}"[:500])
            with self.lock:
                self.counts[(name, outcome)] += 1
                self.busy -= 1

    def quiet_point(self, baseline: list[list[int]]) -> dict:
        self.running.clear()
        while self.busy:
            time.sleep(0.1)
        deadline, stats = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            status, stats = http_json("GET", f"{self.url}/am/stats")
            if status == 200 and stats["idle_check"]["idle"]:
                break
            time.sleep(0.2)
        idle = bool(stats and stats.get("idle_check", {}).get("idle"))
        point = {"at_seconds": round(time.monotonic() - self.started, 1), "idle": idle,
                 "leak": stats["idle_check"]["leak"] if idle else None,
                 "sentinel_identical": self.sentinel_answers() == baseline,
                 "documents": stats["documents"] if stats else None}
        self.quiet_points.append(point)
        print(f"quiet point at {point['at_seconds']} s: idle {idle}, leak {point['leak']}, sentinel identical "
              f"{point['sentinel_identical']}, {sum(self.counts.values())} operations", flush=True)
        self.running.set()
        return point

    def run(self) -> dict:
        status, registered = http_json("POST", f"{self.url}/am/documents", {"text": self.sentinel.text, "ratio": 0.2})
        assert status == 200, registered
        self.sentinel_id = registered["doc_id"]
        baseline = self.sentinel_answers()
        self.started = time.monotonic()
        deadline = self.started + 60 * self.args.minutes
        self.running.set()
        workers = [threading.Thread(target=self.worker, args=(i, deadline)) for i in range(self.args.concurrency)]
        for thread in workers:
            thread.start()
        while any(thread.is_alive() for thread in workers):
            time.sleep(min(self.args.quiet_every, max(0.5, deadline - time.monotonic())))
            if time.monotonic() < deadline and any(thread.is_alive() for thread in workers):
                self.quiet_point(baseline)
        for thread in workers:
            thread.join()
        self.quiet_point(baseline)
        status, stats = http_json("GET", f"{self.url}/am/stats")
        operations = {f"{name}:{outcome}": n for (name, outcome), n in sorted(self.counts.items())}
        return {
            "seconds": round(time.monotonic() - self.started, 1),
            "operations": sum(self.counts.values()),
            "by_operation": operations,
            "failures": len(self.failures),
            "failure_messages": self.failures[:20],
            "intended_refusals": sum(n for (_, outcome), n in self.counts.items() if outcome == "refused"),
            "quiet_points": self.quiet_points,
            "leaks": sum(bool(p["leak"]) for p in self.quiet_points),
            "not_idle_at_quiet_points": sum(not p["idle"] for p in self.quiet_points),
            "sentinel_mismatches": sum(not p["sentinel_identical"] for p in self.quiet_points),
            "server_stats": stats,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs")
    parser.add_argument("--max-requests", type=int, default=20000, help="stop after this many operations")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--quiet-every", type=float, default=30.0, help="seconds between quiet points")
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="the server's KV pool (small: evictions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args()
    env = {"SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
    with tempfile.TemporaryDirectory(prefix="soak-evicted-") as save_dir:
        flags = ["--max-total-tokens", str(args.max_total_tokens), "--dtype", "float32", "--enable-metrics",
                 "--am-auto", "--am-auto-min-tokens", "64", "--am-auto-min-requests", "3", "--am-auto-budget", "120",
                 "--am-auto-poll-seconds", "0.2", "--am-auto-save-dir", save_dir]
        with serving(flags, env=env) as url:
            result = Soak(url, args).run()
            result["server_alive_at_end"] = http_json("GET", f"{url}/health")[0] == 200
    write_json(args.out, {**environment(), "arguments": {**vars(args), "out": str(args.out)}, "server_flags": flags,
                          "result": result})
    counters = result["server_stats"]["counters"] if isinstance(result["server_stats"], dict) else {}
    print(json.dumps({k: result[k] for k in ("seconds", "operations", "failures", "intended_refusals", "leaks",
                                             "sentinel_mismatches", "server_alive_at_end")}), flush=True)
    print("server counters:", json.dumps(counters), flush=True)
    healthy = result["server_alive_at_end"] and not (result["failures"] or result["leaks"] or result["sentinel_mismatches"]
                                                      or result["not_idle_at_quiet_points"])
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
