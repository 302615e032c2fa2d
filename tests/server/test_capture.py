"""Bounded query capture: its memory fixed up front, a bounded subset kept across chunked prefills, and a
failure while recording marked without raising inside the forward pass."""

import pytest
import torch

from sglang_am.server.scheduler.capture import QueryCapture


def test_capture_memory_is_fixed_up_front_by_the_query_cap():
    # 2 query heads per KV head: 5000 pooled queries need 2500 positions per layer, whatever the document length.
    capture = QueryCapture({"repeat-prefill": 1.0}, 5000, {"repeat-prefill": 1}, {"repeat-prefill": 10**6}, group=2,
                           layers=range(3), bytes_per_row=64)
    assert capture.nbytes == 2500 * 3 * 64
    mixed = QueryCapture({"self-study": 0.5, "repeat-prefill": 0.5}, 5000, {"self-study": 4, "repeat-prefill": 1},
                         {"self-study": 100, "repeat-prefill": 2000}, group=2, layers=range(1), bytes_per_row=8)
    assert mixed.keep == {"self-study": 100, "repeat-prefill": 1250}  # a self-study answer has at most 100 positions
    assert mixed.nbytes == (4 * 100 + 1250) * 8
    for part in range(3):  # a source's requests are told apart by their part
        mixed.add_request("self-study", 10, 110, part=part)
    with pytest.raises(ValueError, match="unexpected capture request"):
        mixed.add_request("self-study", 10, 110, part=1)
    # Only the layers the solve compacts are kept (Gemma-3: its three global layers of 18).
    globals_only = QueryCapture({"repeat-prefill": 1.0}, 40, {"repeat-prefill": 1}, {"repeat-prefill": 100}, group=1,
                                layers=[5, 11, 17], bytes_per_row=4)
    assert globals_only.nbytes == 40 * 3 * 4
    rows = globals_only.add_request("repeat-prefill", 0, 40)
    for layer in (0, 5, 11, 12, 17):
        globals_only.record(rows, layer, torch.ones(40, 1, 2), torch.arange(40), scale=0.5)
    assert set(rows.rows) == {5, 11, 17} and rows.filled.all() and globals_only.scales == {5: 0.5, 11: 0.5, 17: 0.5}


def test_capture_keeps_a_bounded_subset_across_chunks_and_hands_back_every_layer():
    capture = QueryCapture({"context-prefill": 1.0}, 40, {"context-prefill": 1}, {"context-prefill": 100}, group=2,
                           layers=range(2), bytes_per_row=4)
    rows = capture.add_request("context-prefill", 0, 100)  # keeps 20 of 100 positions
    assert len(rows.positions) == 20 and "did not finish" in capture.problem()
    queries = torch.arange(100 * 4 * 3, dtype=torch.float32).reshape(100, 4, 3)  # [positions, H_q, D]
    for prefix, length in ((0, 37), (37, 63)):  # chunked prefill: two forwards
        planned = rows.plan(prefix, length, offset=5)  # this request's rows start at row 5 of the forward
        forward = torch.cat([torch.zeros(5, 4, 3), queries[prefix : prefix + length]])
        for layer in range(2):
            capture.record(rows, layer, forward[planned[0]], planned[1], scale=0.5)
    rows.finished = True
    assert capture.problem() is None and capture.scales == {0: 0.5, 1: 0.5}
    kept = capture.queries(1)["context-prefill"]  # [H_q, n, D]
    assert torch.equal(kept, queries[rows.positions].transpose(0, 1))
    with pytest.raises(ValueError, match="unexpected capture request"):
        capture.add_request("context-prefill", 0, 100)  # one part only


def test_a_question_keeps_every_position_and_the_positions_that_predict_its_answer_are_marked():
    mixed = QueryCapture({"questions": 0.75, "repeat-prefill": 0.25}, 40, {"questions": 2, "repeat-prefill": 1},
                         {"questions": 6, "repeat-prefill": 100}, group=2, layers=range(1), bytes_per_row=4)
    assert mixed.keep == {"questions": 6, "repeat-prefill": 5}  # a question keeps all of its (at most 6) positions
    capture = QueryCapture({"questions": 1.0}, 40, {"questions": 2}, {"questions": 6}, group=2, layers=range(1),
                           bytes_per_row=4)
    # The second question arrives first; the first has a 3-token answer from position 103.
    second, first = capture.add_request("questions", 100, 104, part=1), capture.add_request("questions", 100, 106, 0, 103)
    assert first.positions.tolist() == list(range(100, 106)) and second.positions.tolist() == list(range(100, 104))
    for rows, length in ((first, 6), (second, 4)):
        planned = rows.plan(100, length, offset=0)
        capture.record(rows, 0, torch.ones(length, 2, 3), planned[1], scale=1.0)
    assert capture.queries(0)["questions"].shape == (2, 10, 3)
    # in the order they arrived: the question without an answer marks its last position, the other its answer's
    assert capture.answer_positions()["questions"].tolist() == [False] * 3 + [True] + [False] * 2 + [True] * 4
    assert capture.parts_of_rows()["questions"].tolist() == [1] * 4 + [0] * 6
    with pytest.raises(ValueError, match="unexpected capture request"):
        capture.add_request("questions", 100, 106, part=1)  # every part is taken
    for bad in ({"part": 2}, {"answer_from": 100}):  # a part out of range; an answer with no question before it
        fresh = QueryCapture({"questions": 1.0}, 40, {"questions": 2}, {"questions": 6}, group=2, layers=range(1),
                             bytes_per_row=4)
        with pytest.raises(ValueError, match="unexpected capture request"):
            fresh.add_request("questions", 100, 106, **bad)


def test_positions_a_cached_prefix_skipped_are_left_out():
    capture = QueryCapture({"self-study": 1.0}, 100, {"self-study": 1}, {"self-study": 10}, group=1, layers=range(1),
                           bytes_per_row=4)
    rows = capture.add_request("self-study", 50, 60)
    rows.finished = True
    assert capture.problem() == "no self-study query was captured"
    queries = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1)
    planned = rows.plan(53, 7, offset=0)  # positions 50..52 came from the cache
    capture.record(rows, 0, queries[3:][planned[0]], planned[1], scale=1.0)
    assert capture.problem() is None and capture.queries(0)["self-study"].flatten().tolist() == list(range(3, 10))


def test_a_failure_while_recording_marks_the_capture_failed_without_raising(monkeypatch, tmp_path):
    capture = QueryCapture({"context-prefill": 1.0}, 8, {"context-prefill": 1}, {"context-prefill": 8}, group=1,
                           layers=range(1), bytes_per_row=4)
    rows = capture.add_request("context-prefill", 0, 8)
    (tmp_path / "faults").write_text("capture")
    monkeypatch.setenv("SGLANG_AM_TEST_FAULTS", str(tmp_path / "faults"))
    capture.record(rows, 0, torch.zeros(8, 1, 1), torch.arange(8), 1.0)  # must not raise inside the forward pass
    assert "injected capture failure" in capture.problem()
    capture.release()
    assert capture.problem() is not None and capture.requests == {"context-prefill": []}
