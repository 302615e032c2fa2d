"""The solve step without a server: a document's KV and captured queries to a prefix with its fidelity guard."""

import dataclasses

import pytest
import torch

from sglang_am.core import evaluate
from sglang_am.core.plan import LayerPlan, pool_queries, with_questions
from sglang_am.core.synthetic import clustered_block
from sglang_am.server.errors import DocumentError
from sglang_am.server.scheduler.solve import (
    HELDOUT_FRACTION,
    NonFiniteInput,
    SolveInputs,
    SolvePlan,
    heldout_questions,
    solve_document,
)
from sglang_am.server.scheduler.solve import solve as solve_document_and_candidate

LENGTH, LAYERS, HEADS, GROUP = 256, 3, 2, 2


def inputs(windows=(None, None, None), questions=True, seed=0) -> SolveInputs:
    """Clustered keys per layer; 'repeat-prefill' queries and, with ``questions``, 4 questions of 8 positions."""
    blocks = [clustered_block(heads=HEADS, length=LENGTH, head_dim=16, num_queries=400, seed=seed + layer)
              for layer in range(LAYERS)]

    def queries(layer):
        pooled = blocks[layer].queries  # [H_kv, n, D] -> [H_q, n / G, D], G query heads per KV head
        per_head = pooled.reshape(HEADS * GROUP, -1, 16)
        sources = {"repeat-prefill": per_head[:, :150]}
        if questions:
            sources["questions"] = per_head[:, 150:182]
        return sources

    answers = torch.zeros(32, dtype=torch.bool)
    answers[6::8] = answers[7::8] = True  # each question's last position and its one-token answer's
    parts = torch.arange(4).repeat_interleave(8)
    return SolveInputs(lambda layer: (blocks[layer].keys, blocks[layer].values), queries, {}, LAYERS, HEADS,
                       {"questions": answers} if questions else {}, {"questions": parts} if questions else {})


def plan(ratio=0.1, questions=True, **fields) -> SolvePlan:
    fractions = with_questions({"repeat-prefill": 1.0}, share=0.75) if questions else {"repeat-prefill": 1.0}
    return SolvePlan(LayerPlan("AM-HighestAttnKeys", ratio, fractions, max_queries_per_head=500), **fields)


def solve(solve_inputs, solve_plan, windows=(None, None, None)):
    return solve_document(solve_inputs, solve_plan, list(range(LENGTH)), windows, {}, {"budget": "x"})


def test_every_compacted_layer_reports_its_heldout_and_answer_errors():
    prefix = solve(inputs(), plan(heldout_questions=frozenset({1})))
    fidelity = prefix.config["fidelity"]
    assert prefix.config["budget"] == "x" and prefix.num_slots == round(0.1 * LENGTH)
    assert set(fidelity["layers"]) == {"0", "1", "2"}
    for layer in fidelity["layers"].values():
        assert set(layer["heldout"]) == {"repeat-prefill", "questions"} and 0 <= layer["answers"] < 2
    answers = [layer["answers"] for layer in fidelity["layers"].values()]
    assert fidelity["relative_l2"] == pytest.approx(sum(answers) / 3, abs=1e-4)  # the guard's figure: the answers


def test_more_slots_fit_the_questions_better_and_a_document_without_them_reports_heldout_queries():
    small, large = (solve(inputs(), plan(ratio)).config["fidelity"]["relative_l2"] for ratio in (0.05, 0.5))
    assert large < small
    agnostic = solve(inputs(questions=False), plan(questions=False)).config["fidelity"]
    layer = agnostic["layers"]["0"]
    assert "answers" not in layer and set(layer["heldout"]) == {"repeat-prefill"}
    assert agnostic["relative_l2"] == pytest.approx(
        sum(entry["heldout"]["repeat-prefill"] for entry in agnostic["layers"].values()) / 3, abs=1e-4)
    assert HELDOUT_FRACTION == 0.1


def test_the_node_is_fitted_to_every_question_and_judged_by_a_candidate_fitted_without_the_heldout_ones():
    # A question left out of the served fit would be computed wrongly by every request that asks it.
    questions_only = SolvePlan(LayerPlan("AM-HighestAttnKeys", 0.5, {"questions": 1.0}, max_queries_per_head=500),
                               heldout_questions=frozenset({1, 3}))
    solve_inputs = inputs()
    prefix, candidate = solve_document_and_candidate(solve_inputs, questions_only, list(range(LENGTH)),
                                                     (None, None, None), {}, {"budget": "x"})
    assert candidate.config == {"budget": "x", "candidate": [1, 3]} and candidate.num_slots == prefix.num_slots
    heldout = (solve_inputs.parts["questions"] == 1) | (solve_inputs.parts["questions"] == 3)
    for layer, figures in prefix.config["fidelity"]["layers"].items():
        keys, values = solve_inputs.kv(int(layer))
        asked = solve_inputs.queries(int(layer))["questions"]
        errors = {}
        for name, node in (("served", prefix), ("candidate", candidate)):
            slots = (node.keys[int(layer)], node.values[int(layer)], node.beta[int(layer)])
            errors[name] = float(evaluate(keys, values, slots, pool_queries(asked[:, heldout], HEADS)).relative_l2.max())
        # 32 pooled rows, 128 slots: the served node reproduces every question position, held-out ones included,
        assert errors["served"] < 1e-3
        # while the figure reported for the held-out questions is the candidate's, which never saw them.
        assert figures["heldout"]["questions"] > 0.1 and errors["candidate"] > 0.1


def test_the_heldout_questions_are_a_seeded_half_and_none_of_a_single_question():
    assert heldout_questions(1) == frozenset() and len(heldout_questions(2)) == 1 and len(heldout_questions(8)) == 4
    assert heldout_questions(25) == heldout_questions(25) and len(heldout_questions(25)) == 12


def test_a_solve_input_with_nan_or_inf_names_its_layer_and_positions():
    clean = inputs()

    def kv(layer):
        keys, values = clean.kv(layer)
        if layer == 1:
            values = values.clone()
            values[:, 17] = float("nan")
        return keys, values

    with pytest.raises(NonFiniteInput, match=r"layer 1: the document's KV read from the pool \(values\) hold 32 NaN or Inf "
                                             r"entries, at positions \[17\] of 256"):
        solve(dataclasses.replace(clean, kv=kv), plan())


@pytest.mark.parametrize("bound, ratio", [(10.0, 0.05), (1e-9, 0.5)])
def test_auto_ratio_keeps_the_smallest_rung_that_meets_the_bound(bound, ratio):
    ladder = (0.05, 0.2, 0.5)
    prefix = solve(inputs(), plan(ladder=ladder, bound=bound))
    fidelity = prefix.config["fidelity"]
    assert fidelity["ratio"] == ratio and prefix.num_slots == round(ratio * LENGTH) and fidelity["bound"] == bound
    assert [rung["ratio"] for rung in fidelity["ladder"]] == list(ladder[: ladder.index(ratio) + 1])


def test_a_middle_rung_is_found_from_the_figures_of_the_ladder():
    ladder = (0.05, 0.2, 0.5)
    walked = solve(inputs(), plan(ladder=ladder, bound=1e-9)).config["fidelity"]["ladder"]
    bound = walked[1]["relative_l2"]  # exactly what the middle rung reaches
    assert solve(inputs(), plan(ladder=ladder, bound=bound)).config["fidelity"]["ratio"] == 0.2


def test_a_required_bound_refuses_after_solving_only_the_top_rung_and_else_walks_up_from_the_smallest():
    ladder = (0.05, 0.2, 0.5)
    top = solve(inputs(), plan(ladder=ladder, bound=1e-9)).config["fidelity"]  # walked to the top, 0.5
    walked = top["ladder"]
    with pytest.raises(DocumentError) as refused:
        solve(inputs(), plan(ladder=ladder, bound=walked[2]["relative_l2"] * 0.99, required=True))
    assert refused.value.status == 422 and "no ratio up to 0.5" in refused.value.message
    with pytest.raises(DocumentError) as early:  # the first of 3 layers alone puts the figure over: no more solved
        solve(inputs(), plan(ladder=ladder, bound=1e-9, required=True))
    assert f"(at 0.5: {round(top['layers']['0']['answers'] / LAYERS, 5)})" in early.value.message
    met = solve(inputs(), plan(ladder=ladder, bound=walked[1]["relative_l2"], required=True)).config["fidelity"]
    assert met["ratio"] == 0.2 and [rung["ratio"] for rung in met["ladder"]] == [0.5, 0.05, 0.2]


def test_a_window_layer_keeps_its_window_and_is_judged_only_when_compacted():
    windows = (None, 64, None)
    kept = solve(inputs(), plan(), windows)
    # The node is 64 slots wide on every layer anyway: the global layers are fitted to all of them.
    assert kept.layer_slots == [64, 64, 64] and set(kept.config["fidelity"]["layers"]) == {"0", "2"}
    assert torch.equal(kept.beta[1], torch.zeros(HEADS, 64)) and bool(torch.isfinite(kept.beta[0]).all())
    narrow = solve(inputs(), plan(), (None, None, None)).config["fidelity"]
    assert kept.config["fidelity"]["relative_l2"] < narrow["relative_l2"]
    compacted = solve(inputs(), SolvePlan(LayerPlan("AM-HighestAttnKeys", 0.1, with_questions({"repeat-prefill": 1.0}),
                                                     max_queries_per_head=500, compact_windows=True)), windows)
    assert compacted.layer_slots == [26, 26, 26] and set(compacted.config["fidelity"]["layers"]) == {"0", "1", "2"}


def test_rungs_below_the_window_width_give_the_same_node():
    ladder = (0.05, 0.1, 0.5)
    fidelity = solve(inputs(), plan(ladder=ladder, bound=1e-9), (None, 64, None)).config["fidelity"]
    walked = fidelity["ladder"]
    assert [rung["ratio"] for rung in walked] == [0.05, 0.1, 0.5] and fidelity["ratio"] == 0.5
    assert walked[0]["relative_l2"] == walked[1]["relative_l2"] != walked[2]["relative_l2"]  # 0.05 and 0.1: 64 slots
