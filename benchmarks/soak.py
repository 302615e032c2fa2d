"""Soak test: one extension server with automatic compaction and a small KV pool, under mixed traffic with
hostile input and injected faults.

Bounded by --minutes and --max-requests, loopback only. Workers pick operations at random: questions
on documents that automatic compaction picks up, unrelated prompts of random length (eviction
pressure on the --max-total-tokens pool), explicit register/drop of churn documents, questions on
those, streaming requests whose client disconnects after the first chunk, requests aborted through
/abort_request, malformed registrations, registrations dropped while they run (or outliving the
solve deadline), saves and loads against a small store quota, and injected faults (a failing solver,
a dying solver thread, a failing capture, a full disk; ``SGLANG_AM_TEST_FAULTS``). Every
--quiet-every seconds the workers pause; once the scheduler is idle, SGLang's pool invariant is
checked through /am/stats (the server also runs SGLang's strict idle memory and tree checks, which
stop it on a leak) and a registered sentinel document must still be there and give the same greedy
tokens as at the start. At the end every stored document must load. Intended refusals (4xx for bad
input, 409 for a document in use or dropped while registering, 404 for one already dropped, 503 for a
full pool or a solve past its deadline, 507 for a full store, and the failure an injected fault
causes) are counted, not failures.

    python benchmarks/soak.py --minutes 10         # the closing-note run
    python benchmarks/soak.py --minutes 1 --quiet-every 15   # what CI runs (tests/test_project.py)

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

from common import RESULTS_DIR, environment, finish

from sglang_am.client import http_json
from sglang_am.recall_model import recall_task
from sglang_am.serve import serving

OPERATIONS = {"ask_auto": 0.3, "filler": 0.12, "register": 0.06, "drop": 0.06, "ask_churn": 0.06,
              "disconnect": 0.09, "abort": 0.09, "hostile": 0.08, "cancel": 0.04, "save_load": 0.06, "fault": 0.04}
# Refusals that are part of the contract (anything 5xx is refused only where a fault was injected on purpose).
INTENDED = {"register": {409, 503}, "drop": {404, 409}, "hostile": {400, 404, 413, 503}, "cancel": {404, 409, 503},
            "save_load": {404, 409, 503, 507}}
FAULTS = {"solve": 500, "solver_exit": 500, "capture": 503, "store_write": 507}
WORDS = [f"w{i}" for i in range(200)]
KEY = "soak-admin"  # the store's routes need the server's admin key
SOLVE_TIMEOUT = 5  # seconds: the slow registrations run past it
NASTY = [None, True, -1, 0, 2**63, 1e308, "", "x" * 3000, "../../etc", [], [[1]], {}, {"a": {"b": []}}, "AM-OMP", 0.5]
FIELDS = ["text", "input_ids", "ratio", "budget", "method", "query_source", "head_budgets", "max_queries_per_head",
          "self_study_max_new_tokens", "keep_first", "options", "compact_windows"]


class Soak:
    def __init__(self, url: str, args, faults: Path):
        self.url, self.args, self.faults = url, args, faults
        self.rng = random.Random(args.seed)
        self.auto_docs = [recall_task(num_pairs=self.rng.randint(70, 140), num_questions=8, seed=100 + i)[0] for i in range(6)]
        self.churn_docs = [recall_task(num_pairs=60, num_questions=4, seed=200 + i)[0] for i in range(3)]
        self.sentinel = recall_task(num_pairs=100, num_questions=4, seed=300)[0]
        self.slow_docs = [recall_task(num_pairs=500, num_questions=1, seed=400 + i)[0] for i in range(3)]
        self.registration_lock = threading.Lock()  # an injected fault must hit only its own registration
        self.injected: Counter = Counter()
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

    def call(self, method: str, path: str, payload=None):
        return http_json(method, f"{self.url}{path}", payload, KEY, timeout=300)

    def op_register(self, rng):
        doc = rng.choice(self.churn_docs)
        with self.registration_lock:
            status, body = self.call("POST", "/am/documents", {"text": doc.text, "ratio": 0.1})
        return self.judge("register", status, body)

    def explicit_ids(self) -> list[str]:
        status, listed = self.call("GET", "/am/documents")
        assert status == 200, listed
        return [d["doc_id"] for d in listed["documents"] if d["origin"] == "explicit" and d["doc_id"] != self.sentinel_id]

    def op_drop(self, rng):
        ids = self.explicit_ids()
        status, body = self.call("DELETE", f"/am/documents/{rng.choice(ids) if ids else '0' * 64}")
        return self.judge("drop", status, body)

    def op_hostile(self, rng):
        body = {name: rng.choice(NASTY) for name in rng.sample(FIELDS, rng.randint(1, len(FIELDS)))}
        status, answer = self.call("POST", "/am/documents", body)
        return self.judge("hostile", status, answer)

    def op_cancel(self, rng):
        """A slow registration, dropped while it runs (or, if the drop comes late, refused at its deadline)."""
        doc = rng.choice(self.slow_docs)
        result = {}
        payload = {"text": doc.text, "ratio": 0.5, "method": "AM-OMP", "query_source": "context-prefill"}
        with self.registration_lock:
            thread = threading.Thread(target=lambda: result.update(answer=self.call("POST", "/am/documents", payload)))
            thread.start()
            time.sleep(rng.uniform(0.1, 2.0))
            status, listed = self.call("GET", "/am/documents")
            assert status == 200, listed
            for doc_id in [d["doc_id"] for d in listed["documents"] if d["T"] > 900 and d["state"] != "ready"]:
                dropped = self.call("DELETE", f"/am/documents/{doc_id}")
                assert dropped[0] in (200, 404), dropped
            thread.join(timeout=300)
        status, body = result["answer"]
        if status == 200:  # a registration that finished before the drop: drop it now
            self.call("DELETE", f"/am/documents/{body['doc_id']}")
            return "ok"
        return self.judge("cancel", status, body)

    def op_save_load(self, rng):
        """Save a churn document, drop it, load it back (each step may be refused as the contract says)."""
        ids = self.explicit_ids()
        if not ids:
            return "ok"
        doc_id = rng.choice(ids)
        with self.registration_lock:
            for method, path in (("POST", "save"), ("DELETE", ""), ("POST", "load")):
                status, body = self.call(method, f"/am/documents/{doc_id}" + (f"/{path}" if path else ""))
                if status != 200:
                    return self.judge("save_load", status, body)
        return "ok"

    def op_fault(self, rng):
        fault = rng.choice(sorted(FAULTS))
        with self.registration_lock:
            self.faults.write_text(fault)
            try:
                if fault == "store_write":
                    ids = self.explicit_ids()
                    if not ids:
                        return "ok"
                    status, body = self.call("POST", f"/am/documents/{ids[0]}/save")
                else:
                    doc = rng.choice(self.churn_docs)
                    status, listed = self.call("GET", "/am/documents")
                    existing = {d["doc_id"] for d in listed["documents"]}
                    status, body = self.call("POST", "/am/documents", {"text": doc.text, "ratio": 0.1})
                    if status == 200 and body["doc_id"] in existing:
                        return "ok"  # registered before the fault: nothing was solved
            finally:
                self.faults.write_text("")
        if status == FAULTS[fault]:
            self.injected[fault] += 1
            return "refused"
        # Nothing to inject into: the document was dropped meanwhile, or the pool or store was full.
        assert status in (404, 409, 503, 507), f"fault {fault}: {status} {str(body)[:300]}"
        return "refused"

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
        status, body = self.call("POST", "/abort_request", {"rid": rid})  # an admin route of SGLang
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

    def sentinel_present(self) -> bool:
        return self.call("GET", f"/am/documents/{self.sentinel_id}")[0] == 200

    def stored_documents_load(self) -> tuple[int, int]:
        """(stored documents, those that cannot be loaded): every stored copy must install (one at a time,
        dropped again unless it was installed already)."""
        status, stored = self.call("GET", "/am/store")
        assert status == 200, stored
        lost = 0
        for entry in stored["documents"]:
            status, body = self.call("POST", f"/am/documents/{entry['doc_id']}/load")
            lost += status != 200
            if status == 200 and not body["existing"] and body["origin"] == "explicit":
                self.call("DELETE", f"/am/documents/{entry['doc_id']}")
        return len(stored["documents"]), lost

    def quiet_point(self, baseline: list[list[int]]) -> dict:
        self.running.clear()
        while self.busy:
            time.sleep(0.1)
        deadline, stats = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            status, stats = self.call("GET", "/am/stats")
            if status == 200 and stats["idle_check"]["idle"]:
                break
            time.sleep(0.2)
        idle = bool(stats and stats.get("idle_check", {}).get("idle"))
        point = {"at_seconds": round(time.monotonic() - self.started, 1), "idle": idle,
                 "leak": stats["idle_check"]["leak"] if idle else None,
                 "sentinel_identical": self.sentinel_present() and self.sentinel_answers() == baseline,
                 "documents": stats["documents"] if stats else None}
        self.quiet_points.append(point)
        print(f"quiet point at {point['at_seconds']} s: idle {idle}, leak {point['leak']}, sentinel identical "
              f"{point['sentinel_identical']}, {sum(self.counts.values())} operations", flush=True)
        self.running.set()
        return point

    def run(self) -> dict:
        status, registered = self.call("POST", "/am/documents", {"text": self.sentinel.text, "ratio": 0.2})
        assert status == 200, registered
        self.sentinel_id = registered["doc_id"]
        baseline = self.sentinel_answers()
        self.started = time.monotonic()
        deadline = self.started + 60 * self.args.minutes
        self.running.set()
        # Daemons: an error in this thread must end the run, not leave workers waiting at a quiet point.
        workers = [threading.Thread(target=self.worker, args=(i, deadline), daemon=True) for i in range(self.args.concurrency)]
        for thread in workers:
            thread.start()
        while any(thread.is_alive() for thread in workers):
            time.sleep(min(self.args.quiet_every, max(0.5, deadline - time.monotonic())))
            if time.monotonic() < deadline and any(thread.is_alive() for thread in workers):
                self.quiet_point(baseline)
        for thread in workers:
            thread.join()
        self.quiet_point(baseline)
        stored, lost = self.stored_documents_load()
        self.quiet_point(baseline)  # the loads left nothing behind either
        status, stats = self.call("GET", "/am/stats")
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
            "hostile_inputs": sum(n for (name, _), n in self.counts.items() if name == "hostile"),
            "faults_injected": dict(self.injected),
            "stored_documents": stored,
            "lost_documents": lost + sum(not p["sentinel_identical"] for p in self.quiet_points),
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
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        faults = Path(workdir) / "faults"
        faults.write_text("")
        env = {"SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
               "SGLANG_AM_TEST_FAULTS": str(faults)}
        flags = ["--max-total-tokens", str(args.max_total_tokens), "--dtype", "float32", "--enable-metrics",
                 "--admin-api-key", KEY, "--am-store-dir", str(Path(workdir) / "store"), "--am-store-quota-bytes", "200000",
                 "--am-solve-timeout", str(SOLVE_TIMEOUT),
                 "--am-auto", "--am-auto-min-tokens", "64", "--am-auto-min-requests", "3", "--am-auto-budget", "120",
                 # A fixed ratio: the guarded default refuses these query-agnostic documents, and the soak is about
                 # automatic documents' churn, evictions and reloads (0.5 is what the unguarded ladder installed).
                 "--am-auto-ratio", "0.5", "--am-auto-poll-seconds", "0.2"]
        with serving(flags, env=env) as url:
            result = Soak(url, args, faults).run()
            result["server_alive_at_end"] = http_json("GET", f"{url}/health")[0] == 200
    finish({**environment(), "arguments": {**vars(args), "out": str(args.out)}, "server_flags": flags, "result": result},
           args.out)
    counters = result["server_stats"]["counters"] if isinstance(result["server_stats"], dict) else {}
    print(json.dumps({k: result[k] for k in ("seconds", "operations", "failures", "intended_refusals", "leaks",
                                             "sentinel_mismatches", "hostile_inputs", "faults_injected", "lost_documents",
                                             "server_alive_at_end")}), flush=True)
    print("server counters:", json.dumps(counters), flush=True)
    healthy = result["server_alive_at_end"] and not (result["failures"] or result["leaks"] or result["sentinel_mismatches"]
                                                      or result["not_idle_at_quiet_points"] or result["lost_documents"])
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
