"""Where a decode step's time goes: py-spy samples of SGLang's scheduler while requests decode after one long document.

On the extension's server (torch_native), one real-text document of --length tokens (as ``long_decode.py`` builds
it) with nothing registered, then registered at each --ratios (question-aware). For each configuration,
--concurrency requests decode at once (greedy, ``ignore_eos``, sized to outlast the profile) while ``py-spy record``
samples the scheduler process for --seconds without pausing it. Each sampled stack is put in one bucket, the first
that matches from the top of this list:

- attention: the attention backend's per-request loop (the extension's ``_attend``, SGLang's torch_native decode);
  split into ``attention: KV gather`` (the lines that index the KV pool) and ``attention: SDPA and the rest``;
- the extension's per-step work: any other frame of ``sglang_am`` (document rows, hooks, query capture);
- model, other: the rest of the model's forward (projections, MLP, norms, rotary embedding, logits);
- sampling: SGLang's sampler;
- scheduler and other: batch bookkeeping, output processing, everything else.

Idle samples (the scheduler waiting for work) are not taken. Writes JSON (shares, sample counts, the hottest
stacks) and a PNG under benchmarks/results/. Needs ``pip install py-spy`` and permission to trace the server
(root, or ptrace allowed).

    python benchmarks/decode_profile.py --model smollm2-135m --length 8192 --concurrency 16 --ratios 1.0 0.1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import psutil
from common import RESULTS_DIR, environment, finish
from long_decode import batches, run_batch, sized_documents
from matplotlib.figure import Figure
from transformers import AutoConfig, AutoTokenizer

from sglang_am.batch_qa import complete
from sglang_am.client import DocumentsClient
from sglang_am.serve import MODELS, model_path, server_process

BUCKETS = ("attention: KV gather", "attention: SDPA and the rest", "extension, per step", "model, other", "sampling",
           "scheduler and other")
ATTENTION_FUNCTIONS = ("_attend", "_run_sdpa_forward_decode")
GATHER_MARKERS = ("key_cache[slots]", "value_cache[slots]", "k_cache[per_req_tokens]", "v_cache[per_req_tokens]")


def gather_lines() -> set[tuple[str, int]]:
    """(file name, line) of each attention loop line that indexes the KV pool, read from the installed sources."""
    import sglang.srt.layers.attention.torch_native_backend as stock

    import sglang_am.server.sglang_hooks.attention as ours

    lines = set()
    for module in (ours, stock):
        source = Path(module.__file__)
        for number, text in enumerate(source.read_text().splitlines(), start=1):
            if any(marker in text for marker in GATHER_MARKERS):
                lines.add((source.name, number))
    return lines


def bucket(frames: list[str], gathers: set[tuple[str, int]]) -> str:
    """The bucket of one stack (``frames`` outermost first, each ``qualified.function (/full/path.py:line)``)."""
    located = []
    for frame in frames:
        function, _, place = frame.rpartition(" (")
        path, _, line = place.rstrip(")").rpartition(":")
        located.append((function.rpartition(".")[2], path, int(line) if line.isdigit() else 0))
    for function, path, line in located:
        if function in ATTENTION_FUNCTIONS:  # the attention loop's own line: the gather, or the call it is in
            return BUCKETS[0] if (Path(path).name, line) in gathers else BUCKETS[1]
    ours = [path for _, path, _ in located if "/sglang_am/" in path or "/sglang/" in path]
    if ours and "/sglang_am/" in ours[-1]:  # the innermost project frame is the extension's
        return BUCKETS[2]
    if any(path.endswith("sampler.py") for _, path, _ in located):
        return BUCKETS[4]
    if any("/sglang/srt/models/" in path or "/sglang/srt/layers/" in path for _, path, _ in located):
        return BUCKETS[3]
    return BUCKETS[5]


def scheduler_pid(server) -> int:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "scheduler" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError("no SGLang scheduler process under the server")


def py_spy() -> str | None:
    """py-spy's executable: on the PATH, or beside this interpreter (a virtual environment used without activating it)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def profile(pid: int, seconds: float, rate: int) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) stacks of ``pid`` over ``seconds``: (frames outermost first, samples)."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as output:
        subprocess.run([py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
                        "--format", "raw", "--full-filenames", "--nonblocking", "--output", output.name], check=True,
                       capture_output=True, text=True)
        stacks = []
        for line in Path(output.name).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                stacks.append((stack.split(";"), int(count)))
    return stacks


def profile_configuration(url: str, pid: int, prompts: list[list[int]], args) -> dict:
    """Decode ``args.concurrency`` requests long enough to cover the profile; the buckets' shares of the samples."""
    probe, _ = run_batch(url, prompts, 8)  # the step time, to size the requests
    step = statistics.fmean(gap for answer in probe for gap in answer.inter_token_latencies())
    tokens = min(int((args.seconds + 10) / step) + 16, args.context - max(map(len, prompts)) - 8)
    worker = threading.Thread(target=run_batch, args=(url, prompts, tokens))
    worker.start()
    complete(url, prompts[0][:8], 1, api="native")  # queued behind the batch's prefill: decoding has begun
    stacks = profile(pid, args.seconds, args.rate)
    worker.join()
    gathers, counts = gather_lines(), Counter()
    for frames, count in stacks:
        counts[bucket(frames, gathers)] += count
    total = sum(counts.values())
    hottest = Counter()
    for frames, count in stacks:
        hottest[frames[-1]] += count
    return {"step_seconds_before": round(step, 5), "samples": total,
            "shares": {name: round(counts[name] / max(1, total), 4) for name in BUCKETS},
            "hottest_frames": [{"frame": frame, "share": round(count / max(1, total), 4)}
                               for frame, count in hottest.most_common(12)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS[1:], default="smollm2-135m")
    parser.add_argument("--length", type=int, default=8192, help="document tokens (at most the model's context - 1024)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.1], help="registered ratios profiled "
                        "after the unregistered document")
    parser.add_argument("--seconds", type=float, default=20, help="profile length per configuration")
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/decode_profile_MODEL_LENGTH.json)")
    args = parser.parse_args()
    if py_spy() is None:
        parser.error("py-spy is not installed: pip install py-spy")
    if not all(0 < ratio <= 1 for ratio in args.ratios) or args.concurrency < 1 or args.seconds < 1:
        parser.error("--ratios must be in (0, 1], --concurrency >= 1 and --seconds >= 1")
    path = str(model_path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    args.context = AutoConfig.from_pretrained(path).max_position_embeddings
    workload = "chat" if tokenizer.chat_template else "real-text"
    (document,) = sized_documents(tokenizer, workload, min(args.length, args.context - 1024), 1, 16)
    doc_ids, asked = document.ids, document.asked
    prompts = batches([document], [args.concurrency])[args.concurrency]
    pool = 4 * len(doc_ids) + args.concurrency * 4096 + 4096
    server = server_process(["--model-path", path, "--max-total-tokens", str(pool), "--dtype", "float32"]).start()
    rows = []
    try:
        pid, client = scheduler_pid(server), DocumentsClient(server.url)
        complete(server.url, prompts[0], 1, api="native")
        for ratio in [None, *args.ratios]:
            registered = None if ratio is None else client.register(input_ids=doc_ids, ratio=ratio, questions=asked)
            row = {"config": "no document" if ratio is None else f"ratio {ratio:g}", "ratio": ratio,
                   **profile_configuration(server.url, pid, prompts, args)}
            print(f"{row['config']}: " + ", ".join(f"{name} {share:.0%}" for name, share in row["shares"].items()), flush=True)
            rows.append(row)
            if registered is not None:
                client.drop(registered["doc_id"])
    finally:
        server.kill()  # the runs are over: nothing to drain
    output = Path(args.output or RESULTS_DIR / f"decode_profile_{args.model}_{args.length}.json")
    payload = {**environment(), "inputs": {**vars(args), "document_tokens": len(doc_ids), "max_total_tokens": pool},
               "rows": rows}
    finish(payload, output, plot)


def plot(payload: dict) -> Figure:
    rows, inputs = payload["rows"], payload["inputs"]
    fig = Figure(figsize=(8, 4.5))
    axis = fig.subplots()
    names = [row["config"] for row in rows]
    bottoms = [0.0] * len(rows)
    for name in BUCKETS:
        heights = [row["shares"][name] * row["step_seconds_before"] * 1e3 for row in rows]
        axis.bar(names, heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axis.set_ylabel("decode step (ms), split by py-spy samples")
    axis.legend(fontsize=8)
    fig.suptitle(f"{inputs['model']}: {inputs['document_tokens']}-token document, {inputs['concurrency']} requests "
                 "decoding")
    return fig


if __name__ == "__main__":
    main()
