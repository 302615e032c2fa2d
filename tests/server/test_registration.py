"""The registration request's bounds: every field a client sends is checked and refused with its name,
and a valid request travels to the scheduler unchanged."""

import dataclasses

import pytest

from sglang_am.core import available_methods, get_method
from sglang_am.server.registration import OPTION_BOUNDS, SERVER_SET_OPTIONS, RegistrationRequest

from .samples import CONFIG, IDS, request


@pytest.mark.parametrize("fields, reason", [
    ({"input_ids": IDS[:5]}, "input_ids must be a list of 16 to 4096"),
    ({"input_ids": list(range(5000))}, "input_ids must be a list of 16 to 4096"),
    ({"input_ids": IDS[:-1] + [-1]}, "token ids in [0,"),
    ({"input_ids": IDS[:-1] + [1 << 40]}, "token ids in [0,"),
    ({"input_ids": IDS[:-1] + [True]}, "token ids"),
    ({"input_ids": "abc" * 10}, "input_ids must be a list"),
    ({"input_ids": None, "text": ""}, "text must be a non-empty string"),
    ({"input_ids": None, "text": "x" * (4096 * 64 + 1)}, "text must be a non-empty string of at most"),
    ({"text": "hello"}, "exactly one of text, input_ids or messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "exactly one of text, input_ids or messages"),
    ({"input_ids": None, "messages": []}, "messages must be a list of 1 to 64"),
    ({"input_ids": None, "messages": {"role": "system"}}, "messages must be a list of 1 to 64"),
    ({"input_ids": None, "messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role must be one of"),
    ({"input_ids": None, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     "messages[0].content must be a non-empty string"),
    ({"input_ids": None, "messages": [{"role": "user", "content": "x", "name": "n"}]}, 'exactly "role" and "content"'),
    ({"input_ids": None, "messages": [{"role": "system", "content": "x" * (4096 * 64 + 1)}]}, "messages hold"),
    ({"ratio": None}, "exactly one of ratio"),
    ({"budget": 10}, "exactly one of ratio"),
    ({"ratio": 0.0}, "ratio must be in (0, 1]"),
    ({"ratio": 1.5}, "ratio must be in (0, 1]"),
    ({"ratio": float("nan")}, "ratio must be in (0, 1]"),
    ({"ratio": True}, "ratio must be in (0, 1]"),
    ({"ratio": None, "budget": 0}, "budget must be an int in [1, 4096]"),
    ({"ratio": None, "budget": 2.5}, "budget must be an int"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": 7}, "method must be a string"),
    ({"query_source": "random"}, "query_source for the server must use"),
    ({"query_source": "x" * 100}, "query_source must be a source name"),
    ({"query_source": {"repeat-prefill": 0.5}}, "sum to 1"),
    ({"query_source": ["repeat-prefill"]}, "query_source must be a source name"),
    ({"max_queries_per_head": 0}, "max_queries_per_head must be an int in [1, 8000]"),
    ({"max_queries_per_head": 8001}, "max_queries_per_head must be an int in [1, 8000]"),
    ({"self_study_max_new_tokens": 10**6}, "self_study_max_new_tokens must be an int in [1, 512]"),
    ({"keep_first": -1}, "keep_first must be an int in [0, 4096]"),
    ({"head_budgets": [1, 2]}, "head_budgets must be the head-budget JSON object"),
    ({"head_budgets": {"L0H0": 2.0}}, "sum"),
    ({"head_budgets": {"bad": 1.0}}, "not of the form"),
    ({"options": [1]}, "options must be an object"),
    ({"options": {"scale": 2.0}}, "options.scale is set by the server"),
    ({"options": {"layer": 1}}, "options.layer is set by the server"),
    ({"options": {"nnls_iters": 100_000_000}}, "options.nnls_iters must be a int in [0, 1000]"),
    ({"options": {"nnls_iters": 1.5}}, "options.nnls_iters must be a int"),
    ({"options": {"beta_min": float("-inf")}}, "options.beta_min must be a float"),
    ({"options": {"beta_max": 1e9}}, "options.beta_max must be a float in [-50, 50]"),
    ({"options": {"query_chunk": 1 << 30}}, "options.query_chunk must be null or a int in [1, 65536]"),
    ({"options": {"seed": -1}}, "options.seed must be a int"),
    ({"options": {"fit_beta": "yes"}}, "options.fit_beta must be a bool"),
    ({"options": {"score": "x" * 100}}, "options.score must be a str"),
    ({"options": {"score": "median"}}, "score must be one of"),
    ({"options": {"colour": "red"}}, "unknown option 'colour'"),
    ({"options": {"keys_per_step": 4}}, "unknown option(s) ['keys_per_step']"),
    ({"method": "AM-OMP", "options": {"keys_per_step": 5000}}, "options.keys_per_step must be a int in [1, 1024]"),
    ({"method": "AM-OMP", "options": {"schedule": [[None, 4, 2]] * 17}}, "options.schedule must be null or a schedule"),
    ({"method": "AM-OMP", "options": {"schedule": [[None, 0, 2]]}}, "options.schedule must be null or a schedule"),
    ({"method": "AM-OMP", "options": {"drop_rounds": 11}}, "options.drop_rounds must be a int in [0, 10]"),
    ({"options": {"beta_min": 3.0, "beta_max": 1.0}}, "must be below beta_max"),
    ({"options": {"stats_backend": "quantum"}}, "stats_backend must be one of"),
    ({"compact_windows": 1}, "compact_windows must be true or false"),
    ({"compact_windows": "yes"}, "compact_windows must be true or false"),
    ({"questions": "What is K1?"}, "questions must be a list of 1 to 64 prompts"),
    ({"questions": []}, "questions must be a list of 1 to 64 prompts"),
    ({"questions": ["q"] * 65}, "questions must be a list of 1 to 64 prompts"),
    ({"questions": [""]}, "questions[0] must be a non-empty string"),
    ({"questions": ["x" * (256 * 64 + 1)]}, "questions[0] must be a non-empty string of at most"),
    ({"questions": [[1, 2], list(range(257))]}, "questions[1] must be a string or a list of 1 to 256 token ids"),
    ({"questions": [[-1]]}, "questions[0] must be a string or a list"),
    ({"questions": [[True]]}, "questions[0] must be a string or a list"),
    ({"questions": [None]}, "questions[0] must be a string or a list"),
    ({"query_source": {"questions": 1.0}}, "query_source uses questions: give them in questions"),
    ({"ratio": "half"}, 'ratio must be in (0, 1] or "auto"'),
    ({"fidelity_bound": 0.2}, 'fidelity_bound goes with "ratio": "auto"'),
    ({"ratio": "auto", "fidelity_bound": 0}, "fidelity_bound must be a relative attention error in (0, 10]"),
    ({"ratio": "auto", "fidelity_bound": True}, "fidelity_bound must be a relative attention error"),
    ({"ratio": "auto", "questions": [[1], [2]], "fidelity_bound": 0.2}, "fidelity_bound does not apply"),
    ({"ratio": "auto", "agreement_bound": 0.9}, "agreement_bound does not apply"),
    ({"adapt": "yes"}, "adapt must be true or false"),
])
def test_bad_registration_fields_are_refused_with_the_field_named(fields, reason):
    with pytest.raises(ValueError) as error:
        request(**fields)
    assert reason in str(error.value), str(error.value)


@pytest.mark.parametrize("fields, reason", [
    ({"learn": "yes"}, "learn must be true or false"),
    ({"learn": True}, "learn takes the document and its questions only, not ['ratio']"),
    ({"learn": True, "ratio": None, "method": "AM-OMP", "adapt": True},
     "learn takes the document and its questions only, not ['adapt', 'method']"),
    ({"learn": True, "ratio": None, "questions": [[1], {"question": [2], "answer": [3]}]},
     "questions[1].answer: a learned document is fitted to the answers the server generates"),
])
def test_a_learned_registration_takes_the_document_and_questions_only(fields, reason):
    with pytest.raises(ValueError) as error:
        request(**fields)
    assert reason in str(error.value), str(error.value)
    made = request(learn=True, ratio=None, questions=["What is K1?"])
    assert made.learn and made.questions == ("What is K1?",)
    tokenized = made.with_question_ids(CONFIG, lambda text: [ord(c) for c in text])
    assert RegistrationRequest.from_payload(tokenized.to_payload()) == tokenized


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        request(colour="red")


def test_every_option_of_every_method_has_a_bound_or_is_set_by_the_server():
    for method in available_methods():
        for field in dataclasses.fields(get_method(method).options_class):
            assert field.name in OPTION_BOUNDS or field.name in SERVER_SET_OPTIONS, (method, field.name)


def test_a_valid_request_round_trips_through_the_scheduler_payload():
    made = request(method="AM-OMP-fast", query_source="ss-plus-repeat", options={"schedule": [[8, 2, 1], [None, 4, 2]]},
                   head_budgets={"L0H0": 0.5, "L0H1": 0.5}, keep_first=4)
    assert RegistrationRequest.from_payload(made.to_payload()) == made
    assert made.query_source == {"self-study": 0.5, "repeat-prefill": 0.5} and made.head_proportions == {(0, 0): 0.5, (0, 1): 0.5}
    assert request(method="PyramidKV").options == {}  # its layer options come from the server


def test_questions_mix_with_the_query_agnostic_source_and_travel_as_token_ids():
    made = request(questions=[[5, 6, 7], "What is K1?"], query_source="ss-plus-repeat", adapt=True)
    assert made.query_source == {"questions": 1.0}  # given questions, they are the reference queries (QUESTION_SHARE)
    with pytest.raises(ValueError, match="must be token ids"):
        made.to_payload()  # text reaches the scheduler only as ids
    tokenized = made.with_question_ids(CONFIG, lambda text: [ord(c) for c in text])
    assert tokenized.questions == ((5, 6, 7), tuple(ord(c) for c in "What is K1?")) and tokenized.answers == (None, None)
    assert RegistrationRequest.from_payload(tokenized.to_payload()) == tokenized
    explicit = request(questions=[[1]], query_source={"questions": 0.5, "repeat-prefill": 0.5})
    assert explicit.query_source == {"questions": 0.5, "repeat-prefill": 0.5}  # a client's own mixture is kept
    with pytest.raises(ValueError, match=r"questions\[0\] has 300 tokens; this server takes 1 to 256"):
        request(questions=["long"]).with_question_ids(CONFIG, lambda text: [1] * 300)


def test_questions_may_carry_answers_or_be_chat_turns_and_are_bounded():
    made = request(questions=[{"question": "Who?", "answer": " Bob"}, [{"role": "user", "content": "Where?"}], [7, 8]],
                   messages=[{"role": "system", "content": "A document."}], input_ids=None, answer_tokens=8,
                   answer_temperature=0.7)
    assert made.answers == (" Bob", None, None) and made.questions[1] == (("user", "Where?"),)
    turns = []
    tokenized = made.with_question_ids(CONFIG, lambda text: [ord(c) for c in text],
                                       lambda turn: turns.append(turn) or [1, 2, len(turns)])
    # Text and messages questions after a messages document are chat turns; an answer is text after them.
    assert turns == [(("user", "Who?"),), (("user", "Where?"),)]
    assert tokenized.questions == ((1, 2, 1), (1, 2, 2), (7, 8)) and tokenized.answers == ((32, 66, 111, 98), None, None)
    assert [tokenized.answer_length(index) for index in range(3)] == [4, 8, 8]
    assert RegistrationRequest.from_payload(tokenized.to_payload()) == tokenized
    for fields, message in [
        ({"questions": [[{"role": "user", "content": "x"}]]}, "follows a document given as messages"),
        ({"questions": [{"question": "x"}]}, 'exactly "question" and "answer"'),
        ({"questions": [{"question": "x", "answer": [1] * 65}]}, r"questions\[0\].answer must be a string or a list of 1 to 64"),
        ({"answer_tokens": 65}, r"answer_tokens must be an int in \[0, 64\]"),
        ({"answer_temperature": 3}, r"answer_temperature must be in \[0, 2.0\]"),
        ({"questions": [[{"role": "tool", "content": "x"}]], "messages": [{"role": "system", "content": "d"}], "input_ids": None},
         r"questions\[0\]\[0\].role must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            request(**fields)
    with pytest.raises(ValueError, match=r"questions\[0\].answer has 70 tokens; this server takes 1 to 64"):
        request(questions=[{"question": "x", "answer": "long"}]).with_question_ids(CONFIG, lambda text: [1] * 70)


def test_auto_ratio_walks_the_ladder_with_a_bound_and_admission_reserves_its_top():
    from sglang_am.server.registration import DEFAULT_FIDELITY_BOUND, RATIO_LADDER
    from sglang_am.server.scheduler.admission import capture_slots, compacted_slots

    auto = request(ratio="auto")
    assert auto.budget == "auto" and auto.ladder == RATIO_LADDER and auto.fidelity_bound == DEFAULT_FIDELITY_BOUND
    assert request(ratio="auto", fidelity_bound=0.3).fidelity_bound == 0.3 and request().ladder is None
    assert compacted_slots(auto, 200) == round(RATIO_LADDER[-1] * 200) and compacted_slots(request(), 200) == 20
    assert RegistrationRequest.from_payload(auto.to_payload()) == auto
    asked = request(questions=[[1] * 10, {"question": [2] * 30, "answer": [3] * 4}])
    # The document once (questions alone need no repeat copy), then each question and its answer (32 tokens
    # generated, or the one given) beside the others.
    assert capture_slots(asked, 200, 4) == 200 + 64 + (10 + 32 + 64) + (30 + 4 + 64)
