"""Run every GPU path of sglang-am against its torch oracle, and time both.

    python benchmarks/gpu_check.py                  # on a CUDA machine: all checks, realistic sizes
    python benchmarks/gpu_check.py --no-servers     # skip the three end-to-end servers
    python benchmarks/gpu_check.py                  # without CUDA: the Triton checks, tiny, interpreted

Checks (each records its largest error against the oracle, a pass/fail against a stated tolerance, and
median seconds of the path, its oracle and, where one exists, the stock kernel without the bias):

- ``triton-extend`` / ``triton-decode``: SGLang's Triton attention kernels with ``am_bias_score_mod``
  against the torch_native backend's computation (SDPA with the float mask);
- ``flashinfer-prefill`` / ``flashinfer-decode``: FlashInfer's paged wrappers running the
  ``AMDocumentBias`` JIT variant (compiled by nvcc on first use) against the same oracle;
- ``key-scores``: the Triton row-max and key-statistics kernels against ``Block``'s torch statistics;
- ``solver-stats``: ``Block(stats_backend="gpu")`` (FlashInfer targets + Triton scores) against
  ``stats_backend="torch"``, and ``compaction``: held-out attention error of ``compact`` with each;
- ``servers``: one compacted document (registered on a torch_native server, saved) loaded into
  ``triton`` and ``flashinfer`` servers with CUDA graphs on: greedy tokens and top log-probabilities of
  the same requests, against the torch_native server.

Without CUDA, Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors at tiny sizes (their
timings mean nothing) and the FlashInfer and server checks are recorded as skipped, with the reason.
Writes ``benchmarks/results/gpu_check.json`` and a PNG of the timings; exits 1 if a check failed.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from common import RESULTS_DIR, environment, finish  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch.nn.functional import scaled_dot_product_attention  # noqa: E402

from sglang_am import compact, evaluate  # noqa: E402
from sglang_am.core.block import Block  # noqa: E402
from sglang_am.core.synthetic import clustered_block  # noqa: E402
from sglang_am.kernels.bias_table import BiasTable, am_bias_score_mod  # noqa: E402
from sglang_am.kernels.key_scores import key_stats, row_max  # noqa: E402
from sglang_am.server.sglang_hooks.attention import attention_mask  # noqa: E402

CUDA = torch.cuda.is_available()
NO_FLASHINFER = "no CUDA device: FlashInfer has no CPU or interpreter path"
NO_SERVERS = "no CUDA device: this check serves with the GPU backends and CUDA graphs"


@dataclass(frozen=True)
class Sizes:
    q_heads: int
    kv_heads: int
    head_dim: int
    requests: int
    prefix: int  # KV positions already cached per request (the document's slots come first)
    doc_slots: int
    extend: int
    decode_requests: int
    decode_len: int
    solver_heads: int
    solver_length: int
    solver_queries: int
    dtype: torch.dtype


GPU_SIZES = Sizes(32, 8, 128, 4, 4096, 410, 256, 64, 4096, 8, 8192, 4096, torch.bfloat16)
CPU_SIZES = Sizes(4, 2, 32, 2, 40, 8, 6, 3, 30, 2, 96, 40, torch.float32)


def timed(fn, repeats: int) -> tuple[object, float]:
    """``fn()``'s result and its median wall seconds over ``repeats`` runs after one warm-up."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def against_oracle(path, stock, oracle, repeats: int) -> dict:
    """Largest error of ``path()`` against ``oracle()``, and the median seconds of all three."""
    served, seconds = timed(path, repeats)
    _, stock_seconds = timed(stock, repeats)
    expected, oracle_seconds = timed(oracle, repeats)
    return {"max_abs_error": (served.float() - expected).abs().max().item(), "seconds": seconds,
            "stock_seconds": stock_seconds, "oracle_seconds": oracle_seconds}


class Requests:
    """Requests in a KV pool at scattered slots, each with a compacted document's beta on its first
    ``doc_slots`` positions except every third request (no document)."""

    def __init__(self, sizes: Sizes, count: int, kv_len: int, new_tokens: int, device):
        self.sizes, self.count, self.kv_len, self.new_tokens = sizes, count, kv_len, new_tokens
        total = count * kv_len
        shape = (total + 16, sizes.kv_heads, sizes.head_dim)
        self.k_buffer = torch.randn(shape, device=device, dtype=sizes.dtype)
        self.v_buffer = torch.randn(shape, device=device, dtype=sizes.dtype)
        self.slots = torch.randperm(total + 16, device=device)[:total].view(count, kv_len)
        self.queries = torch.randn(count * new_tokens, sizes.q_heads, sizes.head_dim, device=device, dtype=sizes.dtype)
        self.biases = [None if r % 3 == 2 else torch.randn(sizes.kv_heads, sizes.doc_slots, device=device)
                       for r in range(count)]
        self.table = BiasTable(1, sizes.kv_heads, sizes.q_heads // sizes.kv_heads, capacity_slots=count * sizes.doc_slots,
                               max_rows=count * new_tokens + 256, device=device)
        self.bases = [-1 if b is None else self.table.base_of(r, lambda b=b: [b])
                      for r, b in enumerate(self.biases)]
        self.doc_slots = [0 if b is None else sizes.doc_slots for b in self.biases]
        self.scale = sizes.head_dim**-0.5

    def indptr(self, length: int) -> torch.Tensor:
        return torch.arange(0, (self.count + 1) * length, length, dtype=torch.int32, device=self.k_buffer.device)

    def oracle(self) -> torch.Tensor:
        """The torch_native backend: per request, SDPA in float32 with the causal float mask plus beta."""
        outputs, group = [], self.sizes.q_heads // self.sizes.kv_heads
        for r in range(self.count):
            keys = self.k_buffer[self.slots[r]].float().transpose(0, 1)[None]
            values = self.v_buffer[self.slots[r]].float().transpose(0, 1)[None]
            query = self.queries[r * self.new_tokens : (r + 1) * self.new_tokens].float().transpose(0, 1)[None]
            mask = attention_mask(self.new_tokens, self.kv_len, self.biases[r], group, keys.device)
            outputs.append(scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scale,
                                                        enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outputs)


def check_triton_extend(sizes: Sizes, repeats: int) -> dict:
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    req = Requests(sizes, sizes.requests, sizes.prefix + sizes.extend, sizes.extend, "cuda" if CUDA else "cpu")
    req.table.set_rows(req.bases, req.doc_slots, [sizes.extend] * req.count)
    new = req.slots[:, sizes.prefix :].reshape(-1)
    k_new, v_new = req.k_buffer[new].contiguous(), req.v_buffer[new].contiguous()

    def run(score_mod):
        out = torch.empty_like(req.queries)
        extend_attention_fwd(req.queries, k_new, v_new, out, req.k_buffer, req.v_buffer, req.indptr(sizes.extend),
                             req.indptr(sizes.prefix), req.slots[:, : sizes.prefix].reshape(-1), None, True, None,
                             sizes.extend, 1.0, 1.0, sm_scale=req.scale, score_mod=score_mod,
                             aux_tensors=None if score_mod is None else [req.table.aux(0)])
        return out

    return against_oracle(lambda: run(am_bias_score_mod), lambda: run(None), req.oracle, repeats)


def check_triton_decode(sizes: Sizes, repeats: int) -> dict:
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    req = Requests(sizes, sizes.decode_requests, sizes.decode_len, 1, "cuda" if CUDA else "cpu")
    req.table.set_rows(req.bases, req.doc_slots, [1] * req.count)
    splits, device = 8, req.k_buffer.device

    def run(score_mod):
        out = torch.empty_like(req.queries)
        decode_attention_fwd(req.queries, req.k_buffer, req.v_buffer, out, req.indptr(sizes.decode_len),
                             req.slots.reshape(-1),
                             torch.empty(req.count, sizes.q_heads, splits, sizes.head_dim, device=device),
                             torch.empty(req.count, sizes.q_heads, splits, device=device),
                             torch.full((req.count,), splits, dtype=torch.int32, device=device), splits, req.scale,
                             1.0, 1.0, score_mod=score_mod, aux_tensors=None if score_mod is None else [req.table.aux(0)])
        return out

    return against_oracle(lambda: run(am_bias_score_mod), lambda: run(None), req.oracle, repeats)


def _flashinfer_check(sizes: Sizes, repeats: int, decode: bool) -> dict:
    import flashinfer

    from sglang_am.kernels.flashinfer_bias import jit_args

    count, kv_len, new = ((sizes.decode_requests, sizes.decode_len, 1) if decode
                          else (sizes.requests, sizes.prefix + sizes.extend, sizes.extend))
    req = Requests(sizes, count, kv_len, new, "cuda")
    req.table.set_rows(req.bases, req.doc_slots, [1] * count)  # one row per request
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    kv_cache = (req.k_buffer.unsqueeze(1), req.v_buffer.unsqueeze(1))  # pages of one token
    indices, last_page = req.slots.reshape(-1).int(), torch.ones(count, dtype=torch.int32, device="cuda")
    heads = (sizes.q_heads, sizes.kv_heads, sizes.head_dim, 1)

    def wrapper(variant: bool):
        extra = {"jit_args": jit_args(sizes.dtype, sizes.dtype, sizes.head_dim)} if variant else {}
        if decode:
            made = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True, backend="fa2", **extra)
            made.plan(req.indptr(kv_len), indices, last_page, *heads, q_data_type=sizes.dtype, kv_data_type=sizes.dtype)
        else:
            made = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2", **extra)
            made.plan(req.indptr(new), req.indptr(kv_len), indices, last_page, *heads, causal=True,
                      q_data_type=sizes.dtype, kv_data_type=sizes.dtype, sm_scale=req.scale)
        return made

    compile_start = time.perf_counter()
    biased = wrapper(variant=True)
    compile_seconds = time.perf_counter() - compile_start
    stock = wrapper(variant=False)
    result = against_oracle(lambda: biased.run(req.queries, kv_cache, req.table.layer_region(0), req.table.rows(), req.scale),
                            lambda: stock.run(req.queries, kv_cache), req.oracle, repeats)
    return {**result, "build_seconds": compile_seconds}


def check_key_scores(sizes: Sizes, repeats: int) -> dict:
    block = _solver_block(sizes)
    keys, queries = block["keys"].float(), block["queries"]
    torch_block = Block(keys, block["values"].float(), queries, scale=sizes.head_dim**-0.5, stats_backend="torch")
    reference, oracle_seconds = timed(lambda: Block(keys, block["values"].float(), queries, torch_block.scale,
                                                    need_outputs=False, stats_backend="torch").stats, repeats)
    lse = reference.max_logit + reference.mass.log()
    maxima, row_seconds = timed(lambda: row_max(queries, keys, torch_block.scale), repeats)
    (total, squares, best), score_seconds = timed(lambda: key_stats(queries, keys, lse, torch_block.scale), repeats)
    rms = (squares / queries.shape[1]).sqrt()
    reference_rms = (reference.key_sum_squares / queries.shape[1]).sqrt()
    return {"max_abs_error": max((maxima - reference.max_logit).abs().max().item(),
                                 ((rms - reference_rms).abs() / reference_rms.amax(dim=1, keepdim=True)).max().item(),
                                 ((best - reference.key_max).abs()).max().item()),
            "seconds": row_seconds + score_seconds, "oracle_seconds": oracle_seconds}


def _solver_block(sizes: Sizes) -> dict:
    """A clustered synthetic block on the check's device: keys, values and held-out/suffix tensors in the
    check's dtype (the KV cache's), reference queries in float32 (as the server's solver passes them) but
    rounded to that dtype, so that comparing statistics measures the kernels, not FlashInfer's input
    rounding (which ``compaction`` includes)."""
    block = clustered_block(heads=sizes.solver_heads, length=sizes.solver_length, head_dim=sizes.head_dim,
                            num_queries=sizes.solver_queries, num_heldout=256, seed=0)
    device = "cuda" if CUDA else "cpu"
    tensors = {name: getattr(block, name).to(device, sizes.dtype)
               for name in ("keys", "values", "heldout_queries", "suffix_keys", "suffix_values")}
    return {**tensors, "queries": block.queries.to(device, sizes.dtype).float()}


def check_solver_stats(sizes: Sizes, repeats: int) -> dict:
    block = _solver_block(sizes)
    make = lambda backend: Block(block["keys"], block["values"], block["queries"], scale=sizes.head_dim**-0.5,
                                 stats_backend=backend).stats
    gpu, seconds = timed(lambda: make("gpu"), repeats)
    ref, oracle_seconds = timed(lambda: make("torch"), repeats)
    relative = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    errors = {"max_logit": (gpu.max_logit - ref.max_logit).abs().max().item(), "mass": relative(gpu.mass, ref.mass),
              "outputs": relative(gpu.outputs, ref.outputs),
              "rms_scores": relative(gpu.key_sum_squares.sqrt(), ref.key_sum_squares.sqrt())}
    return {"max_abs_error": max(errors.values()), "errors": errors, "seconds": seconds, "oracle_seconds": oracle_seconds}


def check_compaction(sizes: Sizes, repeats: int) -> dict:
    block = _solver_block(sizes)
    block["queries"] = clustered_block(heads=sizes.solver_heads, length=sizes.solver_length, head_dim=sizes.head_dim,
                                       num_queries=sizes.solver_queries, seed=0).queries.to(block["keys"].device)
    budget = sizes.solver_length // 10
    results = {}
    for backend in ("gpu", "torch"):
        result, seconds = timed(lambda backend=backend: compact(block["keys"], block["values"], block["queries"], budget,
                                                                stats_backend=backend), repeats)
        error = evaluate(block["keys"], block["values"], result, block["heldout_queries"],
                         suffix_keys=block["suffix_keys"], suffix_values=block["suffix_values"]).mean()
        results[backend] = {"seconds": seconds, **error}
    return {"max_abs_error": abs(results["gpu"]["relative_l2"] - results["torch"]["relative_l2"]),
            "seconds": results["gpu"]["seconds"], "oracle_seconds": results["torch"]["seconds"], "by_backend": results}


def check_servers(sizes: Sizes, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from sglang_am.client import http_json
    from sglang_am.recall_model import recall_task
    from sglang_am.serve import serving

    with tempfile.TemporaryDirectory() as workdir:
        model_path = _random_model(Path(workdir) / "model", sizes)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        (doc,) = recall_task(num_pairs=300, num_questions=8, seed=0)
        ids = tokenizer.encode(doc.text)
        prompts = [tokenizer.encode(f"{doc.text}\n{q.question}") for q in doc.questions]
        prompts.append(tokenizer.encode("a prompt without the document"))
        request = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
                   "return_logprob": True, "top_logprobs_num": 5}
        key = "gpu-check"  # the store's routes need an admin key; every server shares one store
        common = ["--model-path", str(model_path), "--dtype", "bfloat16", "--mem-fraction-static", "0.5",
                  "--admin-api-key", key, "--am-store-dir", str(Path(workdir) / "store")]
        outputs, seconds, errors, doc_id = {}, {}, {}, None
        for backend in ("torch_native", "triton", "flashinfer"):
            flags = [*common, "--attention-backend", backend] + (["--disable-cuda-graph"] if backend == "torch_native" else [])
            try:
                with serving(flags, startup_seconds=1200) as url:
                    if backend == "torch_native":  # the oracle registers the document everyone loads
                        status, body = http_json("POST", url + "/am/documents", {"input_ids": ids, "ratio": 0.2}, key)
                        assert status == 200, body
                        doc_id = body["doc_id"]
                        status, body = http_json("POST", url + f"/am/documents/{doc_id}/save", None, key)
                    else:
                        status, body = http_json("POST", url + f"/am/documents/{doc_id}/load", None, key)
                    assert status == 200, body
                    start = time.perf_counter()
                    status, outputs[backend] = http_json("POST", url + "/generate", request)
                    seconds[backend] = time.perf_counter() - start
                    assert status == 200, outputs[backend]
            except Exception as error:  # one broken backend must not hide the other's result
                if backend == "torch_native":
                    raise
                errors[backend] = repr(error)
    reference, report = outputs["torch_native"], {}
    for backend in ("triton", "flashinfer"):
        if backend in errors:
            report[backend] = {"error": errors[backend], "first_token_logprob_max_diff": float("inf")}
            continue
        same = sum(a["output_ids"] == b["output_ids"] for a, b in zip(outputs[backend], reference))
        first_step = max(_first_step_difference(a, b) for a, b in zip(outputs[backend], reference))
        report[backend] = {"identical_outputs": f"{same}/{len(reference)}", "first_token_logprob_max_diff": first_step,
                           "seconds": seconds[backend]}
    return {"max_abs_error": max(r["first_token_logprob_max_diff"] for r in report.values()),
            "seconds": seconds.get("triton", 0.0), "oracle_seconds": seconds["torch_native"], "by_backend": report}


def _first_step_difference(output: dict, reference: dict) -> float:
    """Largest log-probability difference, at the first generated token, over the top tokens both report."""
    ours, theirs = ({token: logprob for logprob, token, _ in out["meta_info"]["output_top_logprobs"][0]}
                    for out in (output, reference))
    shared = ours.keys() & theirs.keys()
    return max((abs(ours[token] - theirs[token]) for token in shared), default=float("inf"))


def _random_model(path: Path, sizes: Sizes) -> Path:
    """A randomly initialised Qwen3 (2 layers, the check's head sizes) with the recall model's tokenizer."""
    import shutil

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sglang_am.recall_model import default_model_path

    tokenizer_dir = default_model_path()
    config = Qwen3Config(vocab_size=Qwen3Config.from_pretrained(tokenizer_dir).vocab_size, hidden_size=1024,
                         intermediate_size=2048, num_hidden_layers=2, num_attention_heads=sizes.q_heads,
                         num_key_value_heads=sizes.kv_heads, head_dim=sizes.head_dim, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # sharper next-token distributions, so the top tokens do not tie in bf16
        model.lm_head.weight.mul_(10)
    model.to(torch.bfloat16).save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(Path(tokenizer_dir) / name, path / name)
    return path


# name -> (function, tolerance on max_abs_error, why it cannot run without CUDA or None)
CHECKS = {
    "triton-extend": (check_triton_extend, 2e-2, None),
    "triton-decode": (check_triton_decode, 2e-2, None),
    "flashinfer-prefill": (lambda sizes, repeats: _flashinfer_check(sizes, repeats, decode=False), 2e-2, NO_FLASHINFER),
    "flashinfer-decode": (lambda sizes, repeats: _flashinfer_check(sizes, repeats, decode=True), 2e-2, NO_FLASHINFER),
    "key-scores": (check_key_scores, 1e-4, None),
    "solver-stats": (check_solver_stats, 3e-2, NO_FLASHINFER),
    "compaction": (check_compaction, 2e-2, NO_FLASHINFER),
    "servers": (check_servers, 0.1, NO_SERVERS),
}


SHOWN = ('max_abs_error', 'seconds', 'stock_seconds', 'oracle_seconds', 'reason', 'error')  # printed per check

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-servers", action="store_true", help="skip the end-to-end server check")
    parser.add_argument("--repeats", type=int, default=20 if CUDA else 1)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gpu_check.json")
    args = parser.parse_args()
    sizes = GPU_SIZES if CUDA else CPU_SIZES
    results = {}
    for name, (check, tolerance, without_cuda) in CHECKS.items():
        if without_cuda and not CUDA:
            results[name] = {"status": "skipped", "reason": without_cuda}
        elif name == "servers" and args.no_servers:
            results[name] = {"status": "skipped", "reason": "--no-servers"}
        else:
            torch.manual_seed(0)
            try:
                result = check(sizes, args.repeats)
                result["status"] = "passed" if result["max_abs_error"] <= tolerance else "failed"
            except Exception as error:  # a broken path is a result too: record it and go on
                result = {"status": "failed", "error": repr(error), "traceback": traceback.format_exc()}
            results[name] = {"tolerance": tolerance, **result}
        print(f"{name:20s} {results[name]['status']:8s} "
              f"{ {k: v for k, v in results[name].items() if k in SHOWN} }")
    payload = {"environment": environment(), "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
               "sizes": {k: str(v) for k, v in vars(sizes).items()},
               "checks": results}
    finish(payload, args.output, _plot)
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def _plot(payload: dict) -> Figure:
    timed_checks = [(name, r) for name, r in payload["checks"].items() if "seconds" in r]
    figure = Figure(figsize=(9, 4))
    axis = figure.subplots()
    kinds = [("seconds", "GPU path"), ("stock_seconds", "stock kernel, no bias"), ("oracle_seconds", "torch oracle")]
    for offset, (key, label) in enumerate(kinds):
        axis.bar([i + 0.27 * (offset - 1) for i in range(len(timed_checks))],
                 [r.get(key, 0.0) * 1e3 for _, r in timed_checks], width=0.27, label=label)
    axis.set_xticks(range(len(timed_checks)), [name for name, _ in timed_checks], rotation=20)
    axis.set_ylabel("median ms")
    axis.set_yscale("log")
    device = torch.cuda.get_device_name(0) if CUDA else "CPU, Triton interpreter (times not meaningful)"
    axis.set_title(f"sglang-am GPU paths vs torch oracle: {device}")
    axis.legend()
    return figure


if __name__ == "__main__":
    raise SystemExit(main())
