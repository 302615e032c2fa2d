"""The layer plan's reference queries: the questions source, its weight, and the held-out split."""

import pytest
import torch

from sglang_am.core.plan import (
    QUESTION_SHARE,
    LayerPlan,
    fill_queries,
    heldout_positions,
    source_fractions,
    split_heldout,
    with_questions,
)


def test_questions_join_a_query_agnostic_mixture_at_their_share():
    assert QUESTION_SHARE == 1.0 and with_questions({"repeat-prefill": 1.0}) == {"questions": 1.0}  # the default: alone
    assert with_questions({"repeat-prefill": 1.0}, share=0.75) == {"questions": 0.75, "repeat-prefill": 0.25}
    mixed = with_questions(source_fractions("ss-plus-repeat"), share=0.5)
    assert mixed == {"questions": 0.5, "self-study": 0.25, "repeat-prefill": 0.25}
    assert with_questions({"questions": 0.9, "repeat-prefill": 0.1}) == {"questions": 0.9, "repeat-prefill": 0.1}
    with pytest.raises(ValueError, match="share must be in"):
        with_questions({"repeat-prefill": 1.0}, share=0.0)


def test_fill_queries_repeats_every_query_equally_or_subsamples():
    queries = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    generator = torch.Generator().manual_seed(0)
    filled = fill_queries(queries, 12, generator)  # 5 queries to 12 rows: each twice, two of them three times
    assert filled.shape == (2, 12, 1)
    counts = torch.bincount(filled[0, :, 0].long(), minlength=5)
    assert sorted(counts.tolist()) == [2, 2, 2, 3, 3] and torch.equal(filled[1] - 5, filled[0])
    assert fill_queries(queries, 3, generator).shape == (2, 3, 1)
    assert torch.equal(fill_queries(queries, 5, generator), queries)


def test_the_questions_weigh_their_share_of_the_reference_queries():
    """Few question rows against many repeat rows: the questions fill their share of the cap (repeated)."""
    plan = LayerPlan("AM-HighestAttnKeys", 0.1, with_questions({"repeat-prefill": 1.0}, share=0.75), max_queries_per_head=400)
    questions = torch.full((2, 10, 3), 1.0)  # [H_q, positions, D]: 10 positions, 2 query heads
    repeat = torch.full((2, 1000, 3), 2.0)
    pooled = plan.reference_queries({"questions": questions, "repeat-prefill": repeat}, num_kv_heads=1,
                                    generator=torch.Generator().manual_seed(0))
    assert pooled.shape == (1, 400, 3)
    assert int((pooled[0, :, 0] == 1.0).sum()) == 300 and int((pooled[0, :, 0] == 2.0).sum()) == 100


def test_the_heldout_split_is_seeded_bounded_and_never_takes_an_ineligible_position():
    rows = torch.arange(3 * 40 * 2, dtype=torch.float32).reshape(3, 40, 2)
    split = lambda: split_heldout({"questions": rows, "repeat-prefill": rows[:, :5]}, 0.5, 12,
                                  torch.Generator().manual_seed(1))
    fit, heldout = split()
    assert heldout["questions"].shape == (3, 12, 2) and fit["questions"].shape == (3, 28, 2)  # capped at 12
    assert heldout["repeat-prefill"].shape[1] == 2 and fit["repeat-prefill"].shape[1] == 3
    eligible = torch.ones(40, dtype=torch.bool)
    eligible[9::10] = False  # four answer positions
    chosen = heldout_positions(eligible, 0.5, 100, torch.Generator().manual_seed(1))
    assert int(chosen.sum()) == 18 and not (chosen & ~eligible).any()  # half of the 36 eligible
    assert torch.equal(split()[1]["questions"], heldout["questions"])  # the same split every time
    few = {"context-prefill": rows[:, :1]}
    fit, heldout = split_heldout(few, 0.5, 10, torch.Generator().manual_seed(0))
    assert heldout == {} and torch.equal(fit["context-prefill"], few["context-prefill"])  # nothing to spare
