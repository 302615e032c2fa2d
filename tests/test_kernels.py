"""The GPU kernel paths against their torch oracles.

Without CUDA, Triton kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (set in ``conftest.py``):
SGLang's own extend (two-stage and deterministic one-stage) and decode (grouped and MHA) attention
kernels with our ``score_mod`` against the torch_native backend's float mask + SDPA, and our
key-scoring kernels against ``Block``'s torch statistics, all in float32 (the interpreter mishandles
bf16, with or without our code). FlashInfer has no CPU or interpreter path: its variant is rendered
into FlashInfer's sources and one kernel instance is compiled with nvcc; running it (and the FlashInfer
attention targets) is ``benchmarks/gpu_check.py``'s job on a GPU. With CUDA every test runs natively.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_am.core.block import Block, resolve_stats_backend
from sglang_am.kernels.bias_table import BiasTable, am_bias_score_mod
from sglang_am.kernels.flashinfer_bias import TENSOR_NAMES, VARIANT_NAME, generate_sources, jit_args
from sglang_am.kernels.key_scores import key_stats, row_max
from sglang_am.server.sglang_hooks.attention import attention_mask

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# SGLang's kernels may use TF32 products for float32 inputs on a GPU; the interpreter computes in float32.
ATOL = 1e-5 if DEVICE == "cpu" else 3e-3
NO_CUDA = "FlashInfer kernels run only on CUDA devices (no CPU or interpreter path); benchmarks/gpu_check.py runs them"


def test_kernel_sources_install_as_sglang_am_kernels_without_shadowing_pypi_kernels():
    # From the repository root (first on sys.path), `kernels` must still be PyPI's package.
    code = "import kernels, sglang_am.kernels as ours; print(kernels.__file__); print(ours.__file__)"
    pypi, ours = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    assert "site-packages" in pypi and Path(ours).parent == ROOT / "kernels" / "src"


class Batch:
    """Requests over one KV pool: each has a prefix already in the pool and some new tokens."""

    def __init__(self, prefix_lens, extend_lens, q_heads, kv_heads, dim, dtype=torch.float32):
        self.prefix_lens, self.extend_lens = prefix_lens, extend_lens
        self.q_heads, self.kv_heads, self.dim = q_heads, kv_heads, dim
        total = sum(prefix_lens) + sum(extend_lens)
        self.k_buffer = torch.randn(total + 7, kv_heads, dim, dtype=dtype, device=DEVICE)
        self.v_buffer = torch.randn(total + 7, kv_heads, dim, dtype=dtype, device=DEVICE)
        slots = torch.randperm(total + 7, device=DEVICE)[:total]  # scattered pool slots
        self.slots, start = [], 0
        for prefix, extend in zip(prefix_lens, extend_lens):
            self.slots.append(slots[start : start + prefix + extend])
            start += prefix + extend

    def oracle(self, queries, biases, scale):
        """The torch_native backend's computation: per request, SDPA with the float mask."""
        out, start = [], 0
        for slots, extend, bias in zip(self.slots, self.extend_lens, biases):
            keys = self.k_buffer[slots].transpose(0, 1)[None]
            values = self.v_buffer[slots].transpose(0, 1)[None]
            query = queries[start : start + extend].transpose(0, 1)[None]
            mask = attention_mask(extend, len(slots), bias, self.q_heads // self.kv_heads, DEVICE)
            out.append(scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                                    enable_gqa=True)[0].transpose(0, 1))
            start += extend
        return torch.cat(out)


def _documents(table, batch, doc_slots):
    """Place one random beta per request with a document (``None``: no document); -inf pads one slot
    of a narrower head, as the solver does."""
    biases, bases = [], []
    for index, t in enumerate(doc_slots):
        if t is None:
            biases.append(None)
            bases.append(-1)
            continue
        layers = [torch.randn(batch.kv_heads, t, device=DEVICE)]
        layers[0][-1, -1] = float("-inf")
        biases.append(layers[0])
        bases.append(table.base_of(index, lambda layers=layers: layers))
    return biases, bases


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (2, 2)])
def test_sglang_extend_kernel_with_the_bias_score_mod_matches_the_oracle(q_heads, kv_heads):
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    torch.manual_seed(1)
    dim, scale = 32, 32**-0.5
    batch = Batch([20, 7, 12], [5, 3, 4], q_heads, kv_heads, dim)
    table = BiasTable(1, kv_heads, q_heads // kv_heads, capacity_slots=64, max_rows=64, device=DEVICE)
    biases, bases = _documents(table, batch, [8, None, 6])
    table.set_rows(bases, [0 if b is None else b.shape[1] for b in biases], batch.extend_lens)
    queries = torch.randn(sum(batch.extend_lens), q_heads, dim, device=DEVICE)
    new = torch.cat([slots[prefix:] for slots, prefix in zip(batch.slots, batch.prefix_lens)])
    prefix_slots = torch.cat([slots[:prefix] for slots, prefix in zip(batch.slots, batch.prefix_lens)])
    indptr = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    def run(score_mod):
        out = torch.empty_like(queries)
        extend_attention_fwd(queries, batch.k_buffer[new].contiguous(), batch.v_buffer[new].contiguous(), out,
                             batch.k_buffer, batch.v_buffer, indptr(batch.extend_lens), indptr(batch.prefix_lens),
                             prefix_slots, None, True, None, max(batch.extend_lens), 1.0, 1.0, sm_scale=scale,
                             score_mod=score_mod, aux_tensors=None if score_mod is None else [table.aux(0)])
        return out

    expected = batch.oracle(queries, biases, scale)
    assert torch.allclose(run(am_bias_score_mod), expected, atol=ATOL)
    assert not torch.allclose(run(None), expected, atol=1e-2)  # the bias matters for this input


def test_sglang_deterministic_extend_kernel_with_the_bias_score_mod_matches_the_oracle():
    """The one-stage kernel SGLang's triton backend uses under --enable-deterministic-inference."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd_unified

    torch.manual_seed(5)
    q_heads, kv_heads, dim, scale = 4, 2, 32, 32**-0.5
    batch = Batch([20, 7, 12], [5, 3, 4], q_heads, kv_heads, dim)
    table = BiasTable(1, kv_heads, q_heads // kv_heads, capacity_slots=64, max_rows=64, device=DEVICE)
    biases, bases = _documents(table, batch, [8, None, 6])
    table.set_rows(bases, [0 if b is None else b.shape[1] for b in biases], batch.extend_lens)
    queries = torch.randn(sum(batch.extend_lens), q_heads, dim, device=DEVICE)
    indptr = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(queries)
    extend_attention_fwd_unified(queries, out, batch.k_buffer, batch.v_buffer, 1.0, 1.0, indptr(batch.extend_lens),
                                 indptr([len(s) for s in batch.slots]), torch.cat(batch.slots),
                                 torch.tensor(batch.prefix_lens, dtype=torch.int32, device=DEVICE),
                                 max(batch.extend_lens), sm_scale=scale, score_mod=am_bias_score_mod,
                                 aux_tensors=[table.aux(0)])
    assert torch.allclose(out, batch.oracle(queries, biases, scale), atol=ATOL)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (2, 2)])  # SGLang's grouped and MHA decode kernels
def test_sglang_decode_kernel_with_the_bias_score_mod_matches_the_oracle(q_heads, kv_heads):
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    torch.manual_seed(2)
    dim, scale, splits = 32, 32**-0.5, 4
    batch = Batch([24, 9, 40], [1, 1, 1], q_heads, kv_heads, dim)
    table = BiasTable(1, kv_heads, q_heads // kv_heads, capacity_slots=64, max_rows=64, device=DEVICE)
    biases, bases = _documents(table, batch, [8, None, 6])
    table.set_rows(bases, [0 if b is None else b.shape[1] for b in biases], [1, 1, 1])
    queries = torch.randn(3, q_heads, dim, device=DEVICE)
    out = torch.empty_like(queries)
    lengths = [len(s) for s in batch.slots]
    indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    decode_attention_fwd(queries, batch.k_buffer, batch.v_buffer, out, indptr, torch.cat(batch.slots),
                         torch.empty(3, q_heads, splits, dim, device=DEVICE), torch.empty(3, q_heads, splits, device=DEVICE),
                         torch.full((3,), splits, dtype=torch.int32, device=DEVICE), splits, scale, 1.0, 1.0,
                         score_mod=am_bias_score_mod, aux_tensors=[table.aux(0)])
    assert torch.allclose(out, batch.oracle(queries, biases, scale), atol=ATOL)


def test_bias_table_places_reuses_frees_and_repacks():
    table = BiasTable(num_layers=2, kv_heads=2, group=1, capacity_slots=10, max_rows=8, device="cpu")  # 20 floats a layer
    bias = lambda t, value: lambda: [torch.full((2, t), value), torch.full((2, t), -value)]
    placed = lambda: pytest.fail("a placed document's bias is not written again")
    assert table.free_slots() == 10
    assert table.base_of(1, bias(3, 1.0)) == 0  # 6 floats
    assert table.base_of(2, bias(4, 2.0)) == 6  # 8 floats
    assert table.base_of(1, placed) == 0 and table.free_slots() == 3
    assert torch.equal(table.layer_region(1)[6:14], torch.full((8,), -2.0))
    with pytest.raises(RuntimeError, match="bias table full"):  # 8 more floats, 6 free
        table.base_of(3, bias(4, 3.0))
    table.release(1)  # document 1 was dropped: its room comes back, and document 2 moves down
    assert table.free_slots() == 6
    assert table.base_of(3, bias(4, 3.0)) == 8
    assert table.base_of(2, placed) == 0
    assert torch.equal(table.layer_region(0)[:16], torch.tensor([2.0] * 8 + [3.0] * 8))
    assert torch.equal(table.layer_region(1)[:16], torch.tensor([-2.0] * 8 + [-3.0] * 8))
    with pytest.raises(ValueError, match=r"bias must be 2 layers of \[2, t\]"):
        table.base_of(9, lambda: [torch.zeros(3, 1)] * 2)


def test_bias_table_rows_reset_what_a_larger_batch_left():
    table = BiasTable(num_layers=1, kv_heads=1, group=1, capacity_slots=4, max_rows=8, device="cpu")
    assert table.set_rows([5, -1], [3, 0], [2, 1]) == 3
    assert table.rows()[:8].tolist() == [5, 3, 5, 3, -1, 0, -1, -1]
    table.set_rows([7], [2], [1])
    assert table.rows()[:6].tolist() == [7, 2, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="9 query rows exceed"):
        table.set_rows([1], [1], [9])
    with pytest.raises(ValueError, match="must be positive"):
        BiasTable(num_layers=0, kv_heads=1, group=1, capacity_slots=4, max_rows=8, device="cpu")


@pytest.mark.parametrize("dim", [32, 40])  # a power of two, and one the kernels pad
def test_key_scoring_kernels_match_the_torch_statistics(dim):
    torch.manual_seed(3)
    keys, values = torch.randn(3, 150, dim, device=DEVICE), torch.randn(3, 150, dim, device=DEVICE)
    queries = torch.randn(3, 70, dim, device=DEVICE) * 2
    block = Block(keys, values, queries, scale=dim**-0.5, stats_backend="torch")
    stats = block.stats
    lse = stats.max_logit + stats.mass.log()
    assert torch.allclose(row_max(queries, keys, block.scale), stats.max_logit, atol=1e-5)
    total, squares, best = key_stats(queries, keys, lse, block.scale)
    assert torch.allclose(total, stats.key_sum, rtol=1e-4, atol=1e-6)
    assert torch.allclose(squares, stats.key_sum_squares, rtol=1e-4, atol=1e-7)
    assert torch.allclose(best, stats.key_max, rtol=1e-4, atol=1e-7)


def test_key_scoring_kernels_reject_bad_input():
    queries, keys = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    with pytest.raises(ValueError, match="must be float32"):
        row_max(queries.double(), keys, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        row_max(queries, keys[:1], 1.0)
    with pytest.raises(ValueError, match=r"lse must be \[H, n\]"):
        key_stats(queries, keys, torch.zeros(2, 4), 1.0)


def test_stats_backend_is_chosen_by_device_and_can_be_forced():
    keys = torch.randn(2, 8, 64)  # on the CPU
    assert resolve_stats_backend("auto", keys, None) == "torch"
    assert resolve_stats_backend("torch", keys, None) == "torch"
    with pytest.raises(ValueError, match="stats_backend='gpu' needs CUDA keys"):
        resolve_stats_backend("gpu", keys, None)
    with pytest.raises(ValueError, match="stats_backend must be one of"):
        resolve_stats_backend("triton", keys, None)


@pytest.mark.skipif(DEVICE != "cuda", reason=NO_CUDA)
def test_flashinfer_statistics_match_the_torch_statistics():
    torch.manual_seed(4)
    keys = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    queries = torch.randn(2, 90, 128, device="cuda").bfloat16().float()  # FlashInfer rounds them to bf16
    gpu = Block(keys, values, queries, scale=128**-0.5, stats_backend="gpu").stats
    ref = Block(keys, values, queries, scale=128**-0.5, stats_backend="torch").stats
    assert torch.allclose(gpu.max_logit, ref.max_logit, atol=1e-4)
    assert torch.allclose(gpu.mass, ref.mass, rtol=2e-2)
    assert torch.allclose(gpu.outputs, ref.outputs, atol=2e-2)
    assert torch.allclose(gpu.key_sum_squares.sqrt(), ref.key_sum_squares.sqrt(), rtol=2e-2, atol=1e-4)


def test_flashinfer_bias_variant_renders_into_flashinfer_sources(monkeypatch):
    # Rendering (into FlashInfer's cache directory) needs a target architecture: without a GPU, name one.
    monkeypatch.setenv("FLASHINFER_CUDA_ARCH_LIST", os.environ.get("FLASHINFER_CUDA_ARCH_LIST", "9.0"))
    args = jit_args(torch.bfloat16, torch.bfloat16, 128)
    sources = generate_sources(args)
    assert all(path.exists() for path in sources)
    kernels = [path for path in sources if "paged_kernel_mask" in path.name]  # one per mask mode
    assert len(kernels) == 4 and all(VARIANT_NAME in path.read_text() for path in kernels)
    config = (kernels[0].parent / "batch_prefill_config.inc").read_text()  # the variant and its parameters
    assert f"struct {VARIANT_NAME}" in config
    assert all(f"float* {name};" in config for name in TENSOR_NAMES) and "double sm_scale;" in config
    with pytest.raises(ValueError, match="fp16/bf16 queries"):
        jit_args(torch.float32, torch.float32, 128)


def test_the_flashinfer_wrappers_take_the_arguments_the_bias_backend_passes():
    # SGLang names these wrappers only where FlashInfer runs; they are FlashInfer's own classes.
    import inspect

    import flashinfer

    from sglang_am.server.compat import FLASHINFER_SIGNATURES

    for target, expected in FLASHINFER_SIGNATURES.items():
        wrapper = getattr(flashinfer, target.rsplit(".", 1)[1])
        assert tuple(inspect.signature(wrapper).parameters) == expected
        assert "args" in inspect.signature(wrapper.run).parameters  # the variant's extra arguments


@pytest.mark.slow
def test_flashinfer_bias_variant_compiles_with_nvcc(monkeypatch):
    """nvcc builds the causal paged-prefill kernel instance with the variant (about a minute on one
    core; linking the module needs the CUDA driver library, which a machine without a GPU lacks)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: the variant's CUDA source cannot be compiled on this machine")
    monkeypatch.setenv("FLASHINFER_CUDA_ARCH_LIST", os.environ.get("FLASHINFER_CUDA_ARCH_LIST", "9.0"))
    from flashinfer.jit.attention.modules import gen_customize_batch_prefill_module

    spec = gen_customize_batch_prefill_module("fa2", *jit_args(torch.bfloat16, torch.bfloat16, 128))
    spec.write_ninja()
    target = next(line.split()[1].rstrip(":") for line in Path(spec.ninja_path).read_text().splitlines()
                  if line.startswith("build ") and line.endswith("batch_prefill_paged_kernel_mask_1.cu"))
    ninja = Path(sys.executable).with_name("ninja")  # installed with SGLang's dependencies
    built = subprocess.run([str(ninja), "-f", str(spec.ninja_path), target], cwd=Path(spec.ninja_path).parent,
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-4000:]
    assert Path(target).stat().st_size > 0
