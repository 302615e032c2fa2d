"""AM-OMP-fast against a plain per-head transcription of the reference algorithm (adamzweiger/compaction,
``OMPCompaction``, as the paper's AM-OMP-fast configures it), written here from its description: at every
budget from 1% to 20% of the keys, on several seeds, the same keys or a held-out error within 2%. And the
greedy loop's memory bound (``memory_bytes``): head groups change nothing; narrowed candidates (a head that
does not fit with every key) change the path, here within 10% of the error."""

import math

import pytest
import torch

from sglang_am import compact, evaluate
from sglang_am.core.methods.omp import memory_plan
from sglang_am.core.synthetic import clustered_block

LO, HI, DROP_BELOW, KEYS_PER_STEP, REFIT_EVERY, REFINEMENTS = 1e-12, math.exp(7.0), -7.0, 4, 2, 3


def _box_lstsq(columns: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's NNLS with no gradient steps: least squares, then clamped to [1e-12, e^7]."""
    return torch.linalg.lstsq(columns, target.unsqueeze(1)).solution.squeeze(1).clamp(LO, HI)


def reference_keys(keys: torch.Tensor, queries: torch.Tensor, budget: int) -> tuple[list[int], torch.Tensor]:
    """One head: OMP on the mass features, 4 keys per step, weights refit on steps 1, 3, 5, ... (and on the first
    step after a drop), then up to 3 rounds that drop keys with log-weight below -7 and refill their slots."""
    scores = queries @ keys.T / math.sqrt(keys.shape[1])
    features = torch.exp(scores - scores.max(dim=1, keepdim=True).values)  # [n, T]
    mass = features.sum(dim=1)
    selected: list[int] = []
    excluded: set[int] = set()
    weights, fitted_before = torch.zeros(0), False
    step, refinements = 0, 0
    while True:
        if len(selected) < budget:
            residual = mass - features[:, selected] @ weights
            correlation = features.T @ residual
            correlation[list(set(selected) | excluded)] = -math.inf
            count = min(KEYS_PER_STEP, budget - len(selected), keys.shape[0] - len(selected) - len(excluded))
            if count == 0:
                break
            selected += correlation.topk(count).indices.tolist()
            if not fitted_before or step % REFIT_EVERY == 0:
                weights, fitted_before = _box_lstsq(features[:, selected], mass), True
            else:  # the new keys wait for the next refit at the smallest weight
                weights = torch.cat([weights, torch.full((count,), LO)])
            step += 1
            continue
        refinements += 1
        if refinements > REFINEMENTS:
            break
        weights = _box_lstsq(features[:, selected], mass)
        bad = weights.log() < DROP_BELOW
        if not bool(bad.any()):
            break
        excluded |= {key for key, drop in zip(selected, bad.tolist()) if drop}
        selected = [key for key, drop in zip(selected, bad.tolist()) if not drop]
        weights, fitted_before = _box_lstsq(features[:, selected], mass), False
        step += 1
    return selected, weights.log()


def reference_compaction(block, budget: int):
    """Every head: the reference's keys and log-weights, then least-squares values on the softmax targets; the
    compacted (keys, values, beta) and each head's selected key indices."""
    keys, values, betas, chosen = [], [], [], []
    scale = 1 / math.sqrt(block.keys.shape[-1])
    for head in range(block.keys.shape[0]):
        k, v, q = block.keys[head], block.values[head], block.queries[head]
        selected, beta = reference_keys(k, q, budget)
        chosen.append(set(selected))
        target = torch.softmax(q @ k.T * scale, dim=1) @ v
        weights = torch.softmax(q @ k[selected].T * scale + beta, dim=1)
        fitted = torch.linalg.lstsq(weights, target).solution
        pad = budget - len(selected)
        keys.append(torch.cat([k[selected], k.new_zeros(pad, k.shape[1])]))
        values.append(torch.cat([fitted, fitted.new_zeros(pad, fitted.shape[1])]))
        betas.append(torch.cat([beta, beta.new_full((pad,), -math.inf)]))
    return (torch.stack(keys), torch.stack(values), torch.stack(betas)), chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.01, 0.02, 0.05, 0.1, 0.2])
def test_omp_fast_matches_the_reference_at_every_budget(ratio, seed):
    block = clustered_block(heads=2, length=1024, head_dim=64, num_queries=512, seed=seed)
    budget = max(1, round(ratio * block.keys.shape[1]))
    ours = compact(block.keys, block.values, block.queries, budget=budget, method="AM-OMP-fast")
    reference, reference_keys_by_head = reference_compaction(block, budget)
    error = evaluate(block.keys, block.values, ours, block.heldout_queries).relative_l2
    reference_error = evaluate(block.keys, block.values, reference, block.heldout_queries).relative_l2
    for head in range(block.keys.shape[0]):
        our_keys = {int(i) for i in ours.indices[head] if i >= 0}
        same_keys = our_keys == reference_keys_by_head[head]
        assert same_keys or error[head] <= 1.02 * reference_error[head], (
            head, len(our_keys & reference_keys_by_head[head]), budget, float(error[head]), float(reference_error[head]))


def test_memory_plan_groups_heads_then_narrows_candidates():
    n, length, width = 1000, 4096, 100
    per_head = 4 * n * (length + 2 * width)
    assert memory_plan(8, n, length, width, 8 * per_head) == (8, length)
    assert memory_plan(8, n, length, width, 3 * per_head) == (3, length)
    assert memory_plan(8, n, length, width, per_head) == (1, length)
    groups, candidates = memory_plan(8, n, length, width, per_head // 2)
    assert groups == 1 and 2 * width <= candidates < length and 4 * n * (candidates + 2 * width) <= per_head // 2
    assert memory_plan(8, n, length, width, 1) == (1, 2 * width)  # never fewer candidates than 2t


@pytest.mark.parametrize("method", ["AM-OMP-fast", "AM-OMP"])
def test_memory_bound_solves_heads_in_groups_without_changing_them(method):
    block = clustered_block(heads=4, length=512, head_dim=32, num_queries=256, seed=5)
    whole = compact(block.keys, block.values, block.queries, budget=26, method=method)
    one_head = 4 * 256 * (512 + 2 * 26)  # bytes: one head with every key
    grouped = compact(block.keys, block.values, block.queries, budget=26, method=method, memory_bytes=one_head)
    assert torch.equal(whole.indices, grouped.indices) and torch.allclose(whole.beta, grouped.beta, atol=1e-4)  # batch order


@pytest.mark.parametrize("ratio", [0.02, 0.05, 0.1])
def test_candidate_keys_keep_the_error_within_10_percent(ratio):
    block = clustered_block(heads=2, length=2048, head_dim=64, num_queries=512, seed=3)
    budget = round(ratio * 2048)
    whole = compact(block.keys, block.values, block.queries, budget=budget, method="AM-OMP-fast")
    half = 4 * 512 * (1024 + 2 * budget)  # half of the keys as candidates
    narrowed = compact(block.keys, block.values, block.queries, budget=budget, method="AM-OMP-fast", memory_bytes=half)
    errors = [evaluate(block.keys, block.values, result, block.heldout_queries).relative_l2 for result in (whole, narrowed)]
    assert (errors[1] <= 1.10 * errors[0]).all(), errors
