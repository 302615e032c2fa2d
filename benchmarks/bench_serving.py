"""SGLang's own serving benchmark on shared prefixes: stock SGLang against the extension.

Runs ``python -m sglang.bench_serving`` (SGLang's tool itself, as a subprocess) with ``--backend sglang
--dataset-name generated-shared-prefix``: --groups prefixes of --system-prompt-len tokens, each followed by
--prompts-per-group questions of --question-len tokens, --output-len tokens out, --concurrency in flight,
shuffled. Each configuration gets a fresh server with the same --max-total-tokens pool:

- ``stock``: SGLang with its radix cache (a reference: its torch_native extend pads each request's queries to
  the whole prefix, which no GPU backend does);
- ``baseline``: the extension with nothing registered: the same attention path as every configuration below,
  SGLang's radix cache holding full prefixes;
- ``control``: the extension with every group's prefix registered at ratio 1.0 (nothing compacted; prefixes the
  pool cannot pin are refused and served by the radix cache): a gain is credited to compaction against this row;
- ``auto``: the extension with ``--am-auto`` and its defaults (or --auto-flags);
- ``explicit``: the extension with every group's prefix registered at --ratio before the run: the prefix is
  the longest token prefix its prompts share, as the server's own ``/tokenize`` gives them.

Per run: req/s, TTFT p50/p99, ITL mean/p99, SGLang's own cache-hit rate (cached / prompt tokens), failed
requests, and for the extension ``/am/stats`` (requests served compacted, fallbacks, compactions, documents
resident).
Both processes see the same prompts: the dataset is generated once per run into a private cache directory
that ``bench_serving`` then reads.

    python benchmarks/bench_serving.py                     # embedded model, 8 and 32 groups, ~10 min here
    python benchmarks/bench_serving.py --model gemma3-270m --groups 4 8 --prompts-per-group 6 --concurrency 4 \\
        --max-total-tokens 8192 --system-prompt-len 1000 --output benchmarks/results/bench_serving_gemma.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS_DIR, environment, finish, register_or_refused
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.client import DocumentsClient, http_json
from sglang_am.serve import MODELS, model_path, serving
from sglang_am.server.chat import common_prefix

CONFIGS = ("stock", "baseline", "control", "auto", "explicit")
GROUP_KEY_TOKENS = 16  # prompts of one group share their first tokens; random prefixes never do


def dataset_args(args, groups: int) -> list[str]:
    return ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(groups),
            "--gsp-prompts-per-group", str(args.prompts_per_group), "--gsp-system-prompt-len",
            str(args.system_prompt_len), "--gsp-question-len", str(args.question_len), "--gsp-output-len",
            str(args.output_len), "--seed", str(args.seed)]


def group_prompts(tokenizer, args, groups: int, home: str) -> list[str]:
    """The run's prompts, generated into ``home``'s cache, where ``bench_serving`` finds the same ones."""
    from sglang.benchmark.datasets.generated_shared_prefix import sample_generated_shared_prefix_requests

    previous = os.environ.get("HOME")
    os.environ["HOME"] = home
    try:
        rows = sample_generated_shared_prefix_requests(
            num_groups=groups, prompts_per_group=args.prompts_per_group, system_prompt_len=args.system_prompt_len,
            question_len=args.question_len, output_len=args.output_len, range_ratio=1.0, tokenizer=tokenizer,
            seed=args.seed)
    finally:
        os.environ["HOME"] = previous or ""
    return [row.prompt for row in rows]


def shared_prefixes(url: str, prompts: list[str], groups: int) -> list[list[int]]:
    """Each group's prefix as the server tokenizes its prompts (its ``/tokenize``: SGLang's tokenizer may add a
    BOS token that the model's own ``AutoTokenizer`` does not, as Gemma's does)."""
    status, body = http_json("POST", url + "/tokenize", {"prompt": prompts})
    if status != 200:
        raise RuntimeError(f"/tokenize answered {status}: {body}")
    by_group: dict[tuple[int, ...], list[list[int]]] = {}
    for ids in body["tokens"]:
        by_group.setdefault(tuple(ids[:GROUP_KEY_TOKENS]), []).append(ids)
    if len(by_group) != groups:
        raise RuntimeError(f"found {len(by_group)} groups of prompts, expected {groups}")
    return [common_prefix(prompts) for prompts in by_group.values()]


def bench(url: str, model: str, args, groups: int, home: str, output: Path) -> dict:
    port = url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", "127.0.0.1",
               "--port", port, "--model", model, "--tokenizer", model, *dataset_args(args, groups),
               "--max-concurrency", str(args.concurrency), "--output-file", str(output), "--disable-tqdm",
               "--cache-report"]
    subprocess.run(command, check=True, env={**os.environ, "HOME": home}, stdout=sys.stderr)
    result = json.loads(output.read_text().splitlines()[-1])
    total = groups * args.prompts_per_group
    return {"request_throughput": result["request_throughput"], "ttft_p50_ms": result["median_ttft_ms"],
            "ttft_p99_ms": result["p99_ttft_ms"], "itl_mean_ms": result["mean_itl_ms"], "itl_p99_ms": result["p99_itl_ms"],
            "completed": result["completed"],
            "failed": total - result["completed"], "duration_s": result["duration"],
            "cache_hit_rate": result.get("cache_report", {}).get("cache_hit_rate_pct")}


def extension_stats(url: str) -> dict:
    stats = DocumentsClient(url).stats()
    counters = stats["counters"]
    return {"hits": counters.get("hits", 0), "fallbacks": counters.get("fallbacks", {}),
            "compactions": counters.get("compactions", {}), "compaction_failures": counters.get("compaction_failures", {}),
            "auto_triggers": counters.get("auto_triggers", 0), "observed_requests": counters.get("observed_requests", 0),
            "reverts": counters.get("reverts", 0),
            "auto_evictions": counters.get("auto_evictions", 0),
            "documents_resident": stats["gauges"]["documents"], "compacted_slots": stats["gauges"]["compacted_slots"]}


def run(config: str, args, path: str, groups: int, prompts: list[str], home: str, scratch: Path) -> dict:
    flags = ["--model-path", path, "--max-total-tokens", str(args.max_total_tokens), "--dtype", args.dtype]
    if config == "stock":
        flags += ["--attention-backend", "torch_native"]
    elif config == "auto":
        flags += ["--am-auto", *args.auto_flags]
    with serving(flags, stock=config == "stock") as url:
        row = {"config": config, "groups": groups}
        if config in ("control", "explicit"):
            ratio = 1.0 if config == "control" else args.ratio
            client = DocumentsClient(url)
            registered = [register_or_refused(client, ratio, input_ids=ids) for ids in shared_prefixes(url, prompts, groups)]
            row["registered_slots"] = sum(doc["slots"] for doc in registered if doc is not None)
            row["refused_registrations"] = registered.count(None)
        row.update(bench(url, path, args, groups, home, scratch / f"{config}_{groups}.jsonl"))
        if config != "stock":
            row.update(extension_stats(url))
        status, _ = http_json("GET", url + "/health")
        row["healthy_after"] = status == 200
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    groups = sorted({row["groups"] for row in rows})
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    configs = [c for c in CONFIGS if any(r["config"] == c for r in rows)]
    width = 0.8 / len(configs)
    for index, config in enumerate(configs):
        mine = {row["groups"]: row for row in rows if row["config"] == config}
        xs = [g + (index - (len(configs) - 1) / 2) * width for g in range(len(groups))]
        for axis, key in zip(axes, ("request_throughput", "ttft_p50_ms", "cache_hit_rate")):
            axis.bar(xs, [mine[g][key] or 0 if g in mine else 0 for g in groups], width, label=config)
    for axis, label in zip(axes, ("requests / s", "TTFT p50 (ms)", "SGLang cache-hit rate (%)")):
        axis.set_xticks(range(len(groups)), [f"{g} groups" for g in groups])
        axis.set_ylabel(label)
    axes[0].legend()
    inputs = payload["inputs"]
    fig.suptitle(f"sglang.bench_serving generated-shared-prefix: {inputs['prompts_per_group']} prompts per group, "
                 f"{inputs['system_prompt_len']}-token prefixes, pool {inputs['max_total_tokens']} slots, "
                 f"concurrency {inputs['concurrency']}")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="recall")
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 32], help="number of prefixes, one run each")
    parser.add_argument("--prompts-per-group", type=int, default=24)
    parser.add_argument("--system-prompt-len", type=int, default=600)
    parser.add_argument("--question-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.1, help="explicit registrations' ratio")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--auto-flags", nargs=argparse.REMAINDER, default=[],
                        help="--am-auto-* flags for the auto configuration (last on the command line)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dtype", help="server dtype (default: auto for the recall model, float32 for Gemma)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "bench_serving.json"))
    args = parser.parse_args()
    if args.ratio <= 0 or args.ratio > 1:
        parser.error(f"--ratio must be in (0, 1], got {args.ratio}")
    args.dtype = args.dtype or ("auto" if args.model == "recall" else "float32")
    path = str(model_path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as home:
        scratch = Path(home)
        for groups in args.groups:
            prompts = group_prompts(tokenizer, args, groups, home)
            for config in args.configs:
                rows.append(run(config, args, path, groups, prompts, home, scratch))
    payload = {**environment(), "inputs": vars(args), "rows": rows}
    finish(payload, Path(args.output), plot)


if __name__ == "__main__":
    main()
