"""Refits from live traffic without a server: the live-query reservoir and an adapting document's refit inputs."""

from types import SimpleNamespace

import pytest
import torch

from sglang_am.core.plan import LayerPlan
from sglang_am.server.scheduler.adapt import Adaptation, LiveQueries, Observation, nbytes
from sglang_am.server.scheduler.solve import SolveInputs, SolvePlan, solve_document


def test_the_reservoir_keeps_a_uniform_sample_of_every_position_seen():
    live = LiveQueries(layers=[0, 2], capacity=100, seed=0)
    kept = torch.zeros(2000)
    stored = [-1] * 100  # which position each slot holds
    for start in range(0, 2000, 50):  # forwards of 50 positions
        planned = live.plan(50)
        rows, slots = planned
        for layer in (0, 2):
            live.record(layer, (rows + start).float().reshape(-1, 1, 1).expand(-1, 2, 3), slots, scale=1.0)
        live.record(1, torch.zeros(len(rows), 2, 3), slots, scale=1.0)  # a layer the solve does not compact
        for row, slot in zip(rows.tolist(), slots.tolist()):
            stored[slot] = start + row
    assert live.seen == 2000 and live.size == 100 and set(live.rows) == {0, 2}
    snapshot = live.snapshot()
    assert snapshot[0].shape == (2, 100, 3) and torch.equal(snapshot[0], snapshot[2])
    assert sorted(snapshot[0][0, :, 0].long().tolist()) == sorted(stored)
    kept[torch.tensor(stored)] = 1
    assert 35 <= int(kept[:1000].sum()) <= 65  # about half of the sample from each half of the stream


def test_a_slot_being_rewritten_is_invalid_until_its_last_layer_is_written():
    live = LiveQueries(layers=[0, 1], capacity=4)
    rows, slots = live.plan(4)
    live.record(0, torch.ones(4, 1, 1), slots, 1.0)
    assert live.size == 0  # a forward that failed before its last layer leaves nothing half written
    live.record(1, torch.ones(4, 1, 1), slots, 1.0)
    assert live.size == 4 and nbytes(2, 4, 1, 1, 4) == 32


def adapting(answers=True, mode="adapt", layers=(0, 1)):
    generator = torch.Generator().manual_seed(0)
    kv = {layer: (torch.randn(1, 64, 8, generator=generator), torch.randn(1, 64, 8, generator=generator))
          for layer in range(2)}
    fitted = {"repeat-prefill": torch.randn(2, 40, 8, generator=generator)}
    if answers:
        fitted["questions"] = torch.randn(2, 6, 8, generator=generator)
    marks = torch.tensor([False, False, True, False, False, True])
    parts = torch.tensor([0, 0, 0, 1, 1, 1])
    inputs = SolveInputs(lambda layer: kv[layer], lambda layer: dict(fitted), {}, 2, 1,
                         {"questions": marks} if answers else {}, {"questions": parts} if answers else {})
    # With questions, a client's own mixture; without, the default: the live queries alone.
    fractions = {"questions": 0.5, "repeat-prefill": 0.5} if answers else {"repeat-prefill": 1.0}
    plan = SolvePlan(LayerPlan("AM-HighestAttnKeys", 0.25, fractions, max_queries_per_head=200))
    prefix = solve_document(inputs, plan, list(range(64)), (None, None), {}, {})
    return Adaptation.start(inputs, plan, layers=list(layers), windows=[None, None], length=64, capacity=16,
                            refit_every=8, reserved_bytes=1000, answer_steps=4, prefix=prefix, mode=mode)


def record(adaptation, count: int) -> torch.Tensor:
    """``count`` new live positions on both layers; their rows ``[count, H_q, D]``."""
    rows = torch.randn(count, 2, 8)
    kept, slots = adaptation.live.plan(count)
    for layer in (0, 1):
        adaptation.live.record(layer, rows[kept], slots, 1.0)
    return rows


def test_an_adaptation_refits_from_its_registration_inputs_with_the_live_queries_as_questions():
    adaptation = adapting()
    assert adaptation.plan.layers.query_fractions == {"questions": 0.5, "repeat-prefill": 0.5}
    assert not adaptation.due()
    rows, slots = adaptation.live.plan(10)
    for layer in (0, 1):
        adaptation.live.record(layer, torch.randn(10, 2, 8), slots, 1.0)
    assert adaptation.due()
    inputs = adaptation.refit_inputs(torch.device("cpu"))
    assert not adaptation.due() and adaptation.seen_at_fit == 10  # counted from here on
    queries = inputs.queries(0)
    assert queries["questions"].shape == (2, 16, 8) and queries["repeat-prefill"].shape == (2, 40, 8)
    assert inputs.answers["questions"].tolist() == [False, False, True, False, False, True] + [False] * 10
    assert inputs.parts["questions"].tolist() == [0, 0, 0, 1, 1, 1] + [-1] * 10  # live rows belong to no question
    prefix = solve_document(inputs, adaptation.plan, list(range(64)), (None, None), {}, {})
    assert prefix.num_slots == 16 and "answers" in prefix.config["fidelity"]["layers"]["0"]
    adaptation.job = SimpleNamespace(done=lambda: False, cancel=lambda reason: setattr(adaptation, "stopped", reason))
    described = adaptation.describe()
    assert described["refitting"] and described["queries_seen"] == described["queries_fitted"] == 10
    adaptation.stop()
    assert adaptation.stopped == "the document was dropped"
    adaptation.job.done = lambda: True
    assert adaptation.describe()["refitting"]  # solved, not yet installed: the served version has not learned it


def test_without_registration_questions_the_live_queries_are_the_questions_and_may_be_held_out():
    adaptation = adapting(answers=False)
    rows, slots = adaptation.live.plan(12)
    for layer in (0, 1):
        adaptation.live.record(layer, torch.randn(12, 2, 8), slots, 1.0)
    assert adaptation.plan.layers.query_fractions == {"questions": 1.0}
    inputs = adaptation.refit_inputs(torch.device("cpu"))
    assert inputs.answers == {} and set(inputs.queries(1)) == {"questions"}  # the repeat queries are not kept
    assert inputs.queries(1)["questions"].shape == (2, 12, 8)
    fidelity = solve_document(inputs, adaptation.plan, list(range(64)), (None, None), {}, {}).config["fidelity"]
    layer = fidelity["layers"]["1"]
    assert "answers" not in layer and set(layer["heldout"]) == {"questions"}
    assert fidelity["relative_l2"] == pytest.approx(
        sum(entry["heldout"]["questions"] for entry in fidelity["layers"].values()) / 2, abs=1e-4)


def test_the_live_fidelity_judges_the_serving_version_on_the_positions_that_arrived_after_its_fit():
    adaptation = adapting()
    record(adaptation, 10)
    adaptation.refit_inputs(torch.device("cpu"))  # a refit began: these 10 are in its fit
    assert all(rows.shape[1] == 0 for rows in adaptation.unfitted().values())
    new = record(adaptation, 5)
    unfitted = adaptation.unfitted()
    assert unfitted[0].shape == (2, 5, 8) and torch.equal(unfitted[0].transpose(0, 1), new)
    adaptation.measure_live(unfitted)
    compacted = adaptation.live_fidelity
    assert compacted["positions"] == 5 and compacted["version"] == 0 and compacted["relative_l2"] > 0.05
    assert adaptation.describe()["live_fidelity"] == compacted
    # A version that holds the document whole (beta 0) serves exactly what the full KV does.
    adaptation.serving = {layer: (*adaptation.kv[layer], torch.zeros(1, 64)) for layer in (0, 1)}
    adaptation.measure_live(unfitted)
    assert adaptation.live_fidelity["relative_l2"] < 1e-5


def test_a_watched_document_keeps_only_what_its_live_figure_reads():
    adaptation = adapting(mode="watch", layers=(1,))  # as if only layer 1 were compacted
    assert set(adaptation.kv) == {1} and adaptation.fitted == {} and set(adaptation.serving) == {1}
    kept, slots = adaptation.live.plan(9)
    adaptation.live.record(1, torch.randn(9, 2, 8), slots, 1.0)
    assert adaptation.due()
    adaptation.measure_live(adaptation.unfitted())
    described = adaptation.describe()
    assert described["mode"] == "watch" and described["live_fidelity"]["positions"] == 9
    assert described["live_fidelity"]["relative_l2"] > 0 and "refits" not in described


def test_an_observation_solves_once_enough_distinct_requests_are_in_and_holds_out_whole_requests():
    observation = Observation(LiveQueries(layers=[0, 1], capacity=64), requests_needed=4, answer_steps=2)
    for request in range(5):
        assert observation.due() == (request == 4)
        part = observation.tag()
        count = 3 if request < 4 else 2
        kept, slots = observation.live.plan(count, [part] * count)
        for layer in (0, 1):
            observation.live.record(layer, torch.full((len(kept), 2, 8), float(part)), slots, 0.5)
    assert observation.due() and observation.live.requests == set(range(5))
    kv = {layer: (torch.randn(1, 32, 8), torch.randn(1, 32, 8)) for layer in range(2)}
    inputs, heldout = observation.fit_inputs(lambda layer: kv[layer], num_layers=2, num_kv_heads=1)
    parts = inputs.parts["questions"]
    assert parts.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 2 and inputs.scales == {0: 0.5, 1: 0.5}
    assert len(heldout) == 2 and heldout < set(range(5))  # a seeded half of the requests, rows and all
    rows = inputs.queries(0)["questions"]
    assert rows.shape == (2, 14, 8) and torch.equal(rows[0, :, 0], parts.float())
    for part in (1, 3, 4):  # greedy requests whose answers were kept: the held-out ones are drawn from them
        observation.note_answer(part, [5, part], 1, [6])
    _, heldout = observation.fit_inputs(lambda layer: kv[layer], num_layers=2, num_kv_heads=1)
    assert len(heldout) == 2 and heldout < {1, 3, 4} and len(observation.heldout_answers()) == 2
    observation.tries = 1  # a refusal: twice as many requests before the next solve
    assert not observation.due() and observation.describe()["requests_needed"] == 8
