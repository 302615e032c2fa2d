"""Long documents through the server: registration time by stage against one plain prefill, and peak memory.

For each model and document length this starts the extension's server (the launcher's CPU flags, SGLang's own
chunked prefill), prefills the document once as an ordinary request (a fresh ``cache_salt``, so nothing is
cached: the plain prefill), then registers it (AM-HighestAttnKeys, ratio 0.1, self-study plus repeat-prefill
queries, at most 5000 per KV head; ``--score-dtype`` sets the solver's precision) and records the stages
the server reports: capture prefill, self-study, the solve (selection, beta, values) and install. The peak
resident memory of the server's processes is sampled during each. Models:

- ``recall``: the embedded recall model (Qwen3, 2 layers, 2 KV heads of 32), float32.
- ``random-8x128``: a Qwen3 with 8 KV heads of 128 (16 query heads, hidden 1024, Qwen3-0.6B's widths) and
  random weights, ``--layers`` layers (default 2), bfloat16, with the recall model's tokenizer; built locally.
- ``gemma3-270m``: Gemma-3-270M, bfloat16; its 3 global layers are compacted, its 15 sliding-window layers
  keep their window.

The solve and the prefill both grow with the number of layers, so a few layers give the per-layer ratio of
a deeper model with the same widths. Documents are seeded random token ids (timing does not depend on the
text). Writes JSON and a PNG under benchmarks/results/.

    python benchmarks/long_documents.py --model recall --lengths 1024 4096 16384 32768
    python benchmarks/long_documents.py --model random-8x128 --lengths 1024 4096 16384
    python benchmarks/long_documents.py --model gemma3-270m --lengths 1024 4096
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, PeakMemory, environment, finish
from matplotlib.figure import Figure
from tqdm import tqdm
from transformers import AutoTokenizer

from sglang_am.client import DocumentsClient, http_json
from sglang_am.serve import model_path, server_process

MODELS = ("recall", "random-8x128", "gemma3-270m")
STAGES = ("prefill_seconds", "self_study_seconds", "solve_seconds", "install_seconds")
QUERY_SOURCE = "ss-plus-repeat"  # what the paper pairs with AM-HighestAttnKeys


def random_8x128_directory(layers: int, parent: Path) -> Path:
    """A Qwen3 with Qwen3-0.6B's widths (8 KV heads of 128), ``layers`` layers and seeded random weights,
    with the recall model's tokenizer, written as a transformers directory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_path("recall"))
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=1_000_000.0, pad_token_id=tokenizer.pad_token_id or 0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    directory = parent / f"random-8x128-{layers}l"
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def document_ids(length: int, vocab: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab, (length,), generator=generator).tolist()


def flush_cache(client: DocumentsClient) -> None:
    """SGLang's ``/flush_cache``, so each measurement starts from an empty tree."""
    status, body = http_json("POST", f"{client.url}/flush_cache", timeout=60)
    if status != 200:
        raise RuntimeError(f"/flush_cache answered {status}: {body}")


def measure(client: DocumentsClient, server_pid: int, ids: list[int], ratio: float, options: dict) -> dict:
    with PeakMemory(server_pid) as plain_memory:
        start = time.perf_counter()
        client.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0},
                        cache_salt=f"plain-{len(ids)}-{time.time()}")
        plain = time.perf_counter() - start
    flush_cache(client)
    with PeakMemory(server_pid) as registration_memory:
        start = time.perf_counter()
        registered = client.register(input_ids=ids, ratio=ratio, query_source=QUERY_SOURCE, options=options)
        wall = time.perf_counter() - start
    client.drop(registered["doc_id"])
    flush_cache(client)
    timings = registered["timings"]
    return {
        "T": registered["T"],
        "slots": registered["slots"],
        "plain_prefill_seconds": round(plain, 3),
        "registration_wall_seconds": round(wall, 3),
        "timings": timings,
        "solve_over_prefill": round(timings["solve_seconds"] / plain, 4),
        "server_rss_baseline_mib": round(plain_memory.baseline / 2**20),
        "server_rss_peak_plain_mib": round(plain_memory.peak / 2**20),
        "server_rss_peak_registration_mib": round(registration_memory.peak / 2**20),
    }


def plot(payload: dict) -> Figure:
    rows = payload["results"]
    fig = Figure(figsize=(12, 4.5))
    bars, scaling = fig.subplots(1, 2)
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        heights = [row["timings"].get(stage, 0.0) for row in rows]
        bars.bar([x + 0.2 for x in xs], heights, 0.4, bottom=bottom, label=stage.removesuffix("_seconds"))
        bottom = [b + h for b, h in zip(bottom, heights)]
    bars.bar([x - 0.2 for x in xs], [row["plain_prefill_seconds"] for row in rows], 0.4, label="plain prefill",
             color="black")
    bars.set_xticks(list(xs), [str(row["T"]) for row in rows])
    bars.set_xlabel("document tokens T")
    bars.set_ylabel("seconds")
    bars.set_yscale("log")
    bars.legend(fontsize=8)
    bars.set_title("registration by stage (right) vs one plain prefill (left)")
    lengths = [row["T"] for row in rows]
    solves = [row["timings"]["solve_seconds"] for row in rows]
    scaling.loglog(lengths, solves, "o-", label="solve")
    scaling.loglog(lengths, [row["plain_prefill_seconds"] for row in rows], "s-", label="plain prefill")
    scaling.loglog(lengths, [solves[0] * length / lengths[0] for length in lengths], ":", color="gray",
                   label="proportional to T")
    scaling.set_xlabel("document tokens T (n is fixed once T x group >= the cap)")
    scaling.set_ylabel("seconds")
    scaling.legend()
    scaling.set_title("growth")
    fig.suptitle(f"sglang-am long documents: {payload['inputs']['model']}")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="recall")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--layers", type=int, default=2, help="layers of the random-8x128 model")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--score-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the solver's score_dtype option (precision of its n x T products)")
    parser.add_argument("--output", type=Path,
                        help="JSON path (default benchmarks/results/long_documents_MODEL[_bfloat16].json)")
    args = parser.parse_args()
    if not 0 < args.ratio <= 1:
        parser.error(f"--ratio must be in (0, 1], got {args.ratio}")
    longest = max(args.lengths)
    suffix = "" if args.score_dtype == "float32" else f"_{args.score_dtype}"
    output = args.output or RESULTS_DIR / f"long_documents_{args.model}{suffix}.json"
    with tempfile.TemporaryDirectory() as scratch:
        if args.model == "random-8x128":
            directory, dtype = random_8x128_directory(args.layers, Path(scratch)), "bfloat16"
        else:
            directory, dtype = model_path(args.model), "bfloat16" if args.model == "gemma3-270m" else "float32"
        vocab = min(len(AutoTokenizer.from_pretrained(directory)), 32000)
        model_flags = ["--model-path", str(directory), "--dtype", dtype]
        # Room for the plain prefill's copy, the repeat-prefill capture (2T) and the self-study answers.
        flags = [*model_flags, "--context-length", str(2 * longest + 1024), "--max-total-tokens", str(4 * longest + 8192),
                 "--am-max-document-tokens", str(longest), "--am-solve-timeout", "3600", "--am-rpc-timeout", "3600"]
        env = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
        server = server_process(flags, env).start(startup_seconds=600)
        rows = []
        try:
            client = DocumentsClient(server.url, timeout=7200)
            client.generate(input_ids=document_ids(64, vocab, seed=1), sampling_params={"max_new_tokens": 1})  # warm-up
            for length in tqdm(args.lengths, desc=f"long documents ({args.model})", unit="document"):
                row = measure(client, server.process.pid, document_ids(length, vocab, seed=length), args.ratio,
                              {"score_dtype": args.score_dtype})
                rows.append(row)
                tqdm.write(f"T={row['T']:>6} plain prefill {row['plain_prefill_seconds']:8.2f}s  registration "
                           f"{row['registration_wall_seconds']:8.2f}s  "
                           + "  ".join(f"{s.removesuffix('_seconds')} {row['timings'].get(s, 0):.2f}s" for s in STAGES)
                           + f"  solve/prefill {row['solve_over_prefill']:.3f}"
                           + f"  peak {row['server_rss_peak_registration_mib']} MiB")
        finally:
            server.kill()  # the runs are over: nothing to drain
    payload = {
        "benchmark": "long_documents",
        "inputs": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "method": "AM-HighestAttnKeys", "query_source": QUERY_SOURCE, "server_flags": flags},
        **environment(),
        "results": rows,
    }
    finish(payload, output, plot)


if __name__ == "__main__":
    main()
