"""Time every compaction method batched over heads against a per-head loop, and against the machine's limit.

Default inputs: H=8 heads, D=128, T in {2048, 8192}, n=4096 reference queries, on a clustered synthetic
block (sglang_am.core.synthetic). Each method's time is also given as a multiple of one score pass (the
n x T matmul and one exp over the scores, streamed as the methods stream them: every method spends at
least that), with the peak memory the batched call added to the process. With ``--official PATH`` (a
checkout of github.com/adamzweiger/compaction, which is never part of this project) the official per-head
code runs AM-HighestAttnKeys and AM-OMP-fast on the same inputs, side by side. ``--score-dtype bfloat16``
runs the n x T products (and the score pass they are measured against) in bfloat16. Writes JSON (inputs,
machine, versions, seconds, errors) and a PNG bar chart under benchmarks/results/.

    python benchmarks/solver_speed.py                 # full run
    python benchmarks/solver_speed.py --official ~/src/compaction --methods AM-HighestAttnKeys AM-OMP-fast
    python benchmarks/solver_speed.py --lengths 32768 --queries 5000 --ratio 0.1 --no-loop \
        --methods AM-HighestAttnKeys AM-OMP-fast --output benchmarks/results/solver_speed_32k.json
    python benchmarks/solver_speed.py --smoke         # seconds-long sanity run
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, PeakMemory, environment, finish
from matplotlib.figure import Figure
from tqdm import tqdm

from sglang_am import compact, evaluate
from sglang_am.core.block import SCORE_DTYPES, query_chunk_for
from sglang_am.core.synthetic import clustered_block

METHODS = ["AM-HighestAttnKeys", "AM-OMP-fast", "AM-OMP", "H2O+", "SnapKV", "PyramidKV", "KVzip-uniform", "KVzip"]
EXTRA_OPTIONS = {"PyramidKV": {"layer": 0, "num_layers": 1}}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def peak_memory(fn) -> tuple[int, int]:
    """The most resident memory ``fn()`` added to the process (sampled every 2 ms), and the process's peak.

    The added figure is RSS growth: memory the allocator kept from an earlier case and reuses here does not
    count, so the absolute peak is recorded too."""
    with PeakMemory(interval=0.002) as memory:
        fn()
    return max(0, memory.peak - memory.baseline), memory.peak


def score_pass_seconds(block, repeats: int, score_dtype: torch.dtype) -> tuple[float, float]:
    """One pass over the n x T scores: the matmul (in ``score_dtype``) and one float32 exp, in the query chunks
    the methods stream; and the matmul alone (what fewer exp evaluations could at best bring the pass down to)."""
    heads, length, dim = block.keys.shape
    queries, keys = block.queries.to(score_dtype), block.keys.to(score_dtype)
    chunk = query_chunk_for(heads, length, None)
    scale = 1 / math.sqrt(dim)

    def one_pass(with_exp: bool) -> None:
        for start in range(0, queries.shape[1], chunk):
            scores = torch.bmm(queries[:, start : start + chunk], keys.transpose(1, 2)).float().mul_(scale)
            if with_exp:
                scores.exp_()

    return tuple(min(timed(functools.partial(one_pass, with_exp))[1] for _ in range(max(1, repeats)))
                 for with_exp in (True, False))


OFFICIAL = {  # the paper's configurations (evaluation/configs/algorithms/default.py), per head
    "AM-HighestAttnKeys": ("HighestAttentionKeysCompaction", {"score_method": "rms", "nnls_iters": 2,
                                                              "nnls_lower_bound": math.exp(-3),
                                                              "nnls_upper_bound": math.exp(3), "c2_method": "lsq"}),
    "AM-OMP-fast": ("OMPCompaction", {"nnls_iters": 0, "nnls_upper_bound": math.exp(7), "drop_key_beta_cutoff": -7,
                                      "c2_method": "lsq", "k_choice": 4, "nnls_interval": 2}),
}


def run_official(block, method: str, budget: int) -> dict | None:
    """The official per-head code on the same inputs: seconds and held-out errors (None for other methods)."""
    if method not in OFFICIAL:
        return None
    import compaction.algorithms as official

    name, settings = OFFICIAL[method]
    algorithm = getattr(official, name)(**settings)
    heads = block.keys.shape[0]

    def per_head():
        return [algorithm.compute_compacted_cache(block.keys[h], block.values[h], block.queries[h], budget)
                for h in range(heads)]

    solved, seconds = timed(per_head)
    width = max(len(beta) for _, beta, _, _ in solved)

    def padded(tensor, fill):
        return torch.cat([tensor.float(), tensor.new_full((width - tensor.shape[0], *tensor.shape[1:]), fill).float()])

    result = (torch.stack([padded(keys, 0.0) for keys, _, _, _ in solved]),
              torch.stack([padded(values, 0.0) for _, _, values, _ in solved]),
              torch.stack([padded(beta, -math.inf) for _, beta, _, _ in solved]))
    return {"seconds": seconds, "heldout_errors": heldout_errors(block, result, range(heads))}


def run_case(block, method: str, budget: int, repeats: int, score_dtype: str, loop: bool) -> dict:
    options = {**EXTRA_OPTIONS.get(method, {}), "score_dtype": score_dtype}
    heads = block.keys.shape[0]

    def batched():
        return compact(block.keys, block.values, block.queries, budget, method, **options)

    def per_head():
        return [
            compact(block.keys[h : h + 1], block.values[h : h + 1], block.queries[h : h + 1], budget, method, **options)
            for h in range(heads)
        ]

    batched_times, loop_times = [], []
    # Memory is sampled in a run of its own: the sampling thread would slow a timed run on a 2-core machine.
    added_bytes, peak_bytes = peak_memory(batched)
    for _ in range(repeats):
        result, seconds = timed(batched)
        batched_times.append(seconds)
        if loop:
            loop_results, seconds = timed(per_head)
            loop_times.append(seconds)
    return {
        "peak_added_mib": round(added_bytes / 2**20, 1),
        "peak_rss_mib": round(peak_bytes / 2**20, 1),
        "method": method,
        "options": options,
        "budget": budget,
        "batched_seconds": min(batched_times),
        "per_head_loop_seconds": min(loop_times) if loop else None,
        "speedup": min(loop_times) / min(batched_times) if loop else None,
        "heldout_errors": heldout_errors(block, result, range(heads)),
        "kept_slots_per_head": result.lengths.tolist(),
        # KVzip's global top-k is not separable by head, so its per-head loop solves another problem.
        "loop_agreement": None if method == "KVzip" or not loop else loop_agreement(block, result, loop_results),
    }


def heldout_errors(block, result, heads) -> dict:
    """Mean held-out errors over ``[block; suffix]`` for the given heads of ``block``."""
    rows = list(heads)
    return evaluate(
        block.keys[rows], block.values[rows], result, block.heldout_queries[rows],
        suffix_keys=block.suffix_keys[rows], suffix_values=block.suffix_values[rows],
    ).mean()


def loop_agreement(block, batched, loop_results) -> dict:
    """How close the per-head solves are to the batched one: shared keys, and the loop's own error.

    Greedy OMP over hundreds of steps can break near-ties differently when BLAS sums in another order
    (batched vs single-matrix kernels), so exact equality is checked by the tests at small sizes and
    reported here as overlap.
    """
    overlaps, loop_errors = [], []
    for h, solo in enumerate(loop_results):
        kept = set(batched.indices[h, : int(batched.lengths[h])].tolist())
        solo_kept = set(solo.indices[0, : int(solo.lengths[0])].tolist())
        overlaps.append(len(kept & solo_kept) / max(1, len(solo_kept)))
        loop_errors.append(heldout_errors(block, solo, [h])["relative_l2"])
    return {
        "identical_keys": all(overlap == 1.0 for overlap in overlaps),
        "key_overlap": sum(overlaps) / len(overlaps),
        "loop_relative_l2": sum(loop_errors) / len(loop_errors),
    }


def plot(payload: dict) -> Figure:
    rows = payload["results"]
    lengths = sorted({row["T"] for row in rows})
    fig = Figure(figsize=(6 * len(lengths), 4.5))
    axes = fig.subplots(1, len(lengths), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        subset = [row for row in rows if row["T"] == length]
        names = [row["method"] for row in subset]
        xs = range(len(subset))
        ax.bar([x - 0.2 for x in xs], [row["batched_seconds"] for row in subset], 0.4, label="batched")
        ax.bar([x + 0.2 for x in xs], [row["per_head_loop_seconds"] or 0 for row in subset], 0.4, label="per-head loop")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), names, rotation=35, ha="right")
        ax.set_ylabel("seconds (log)")
        ax.set_title(f"T={length}, budget={subset[0]['budget']}")
        ax.legend()
    fig.suptitle("sglang-am solver time: batched over heads vs per-head loop")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=8, help="independent heads per call (H)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (D)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="block lengths T to time")
    parser.add_argument("--queries", type=int, default=4096, help="reference queries per head (n)")
    parser.add_argument("--ratio", type=float, default=0.05, help="budget as a fraction of T")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="methods to time")
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats; the minimum is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "solver_speed.json", help="JSON path")
    parser.add_argument("--score-dtype", choices=sorted(SCORE_DTYPES), default="float32",
                        help="precision of the n x T products (the methods' score_dtype option) and of the score pass")
    parser.add_argument("--no-loop", action="store_true", help="skip the per-head loop (long documents)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    parser.add_argument("--official", type=Path, help="a checkout of adamzweiger/compaction: run its per-head code "
                        "side by side (AM-HighestAttnKeys, AM-OMP-fast)")
    args = parser.parse_args()
    if args.official is not None:
        if not (args.official / "compaction" / "algorithms").is_dir():
            parser.error(f"--official {args.official} is not a checkout of adamzweiger/compaction")
        sys.path.insert(0, str(args.official))
        print(f"running the official code from {args.official} side by side (not part of this project)", flush=True)
    if args.smoke:
        args.heads, args.head_dim, args.lengths, args.queries = 2, 16, [128], 64
    if not 0 < args.ratio <= 1:
        parser.error(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, score_pass, matmul_only = [], {}, {}
    cases = [(length, method) for length in args.lengths for method in args.methods]
    blocks = {}
    for length, method in tqdm(cases, desc="solver_speed", unit="case"):
        if length not in blocks:
            blocks[length] = clustered_block(
                heads=args.heads, length=length, head_dim=args.head_dim, num_queries=args.queries,
                num_heldout=512, num_clusters=max(8, length // 64), seed=0,
            )
            score_pass[length], matmul_only[length] = score_pass_seconds(blocks[length], args.repeats,
                                                                         SCORE_DTYPES[args.score_dtype])
            tqdm.write(f"T={length:>5} one score pass {score_pass[length]:.3f}s (the matmul alone {matmul_only[length]:.3f}s)")
        budget = max(1, int(args.ratio * length))
        row = {"T": length, **run_case(blocks[length], method, budget, args.repeats, args.score_dtype, not args.no_loop),
               "score_pass_seconds": score_pass[length], "score_matmul_seconds": matmul_only[length]}
        row["score_passes"] = row["batched_seconds"] / score_pass[length]
        if args.official is not None:
            row["official"] = run_official(blocks[length], method, budget)
        rows.append(row)
        official = row.get("official")
        tqdm.write(
            f"T={length:>5} {method:<20} batched {row['batched_seconds']:8.3f}s ({row['score_passes']:.2f} passes, "
            f"+{row['peak_added_mib']} MiB)  loop {row['per_head_loop_seconds'] or 0:8.3f}s  "
            f"rel_l2 {row['heldout_errors']['relative_l2']:.4f}"
            + (f"  official {official['seconds']:.3f}s rel_l2 {official['heldout_errors']['relative_l2']:.4f}"
               if official else "")
        )
    payload = {
        "benchmark": "solver_speed",
        "inputs": {
            "heads": args.heads, "head_dim": args.head_dim, "lengths": args.lengths, "queries": args.queries,
            "heldout_queries": 512, "ratio": args.ratio, "repeats": args.repeats, "data": "clustered_block(seed=0)",
            "score_dtype": args.score_dtype, "per_head_loop": not args.no_loop,
            "official": str(args.official) if args.official else None,
        },
        **environment(),
        "results": rows,
    }
    finish(payload, args.output, plot)


if __name__ == "__main__":
    main()
