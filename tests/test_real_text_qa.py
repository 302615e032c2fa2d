import re

import pytest

from sglang_am.quality import (
    Question,
    RealTextQuestion,
    choice_text,
    question_prompt,
    real_text,
    real_text_qa,
    short_answer_correct,
)
from sglang_am.quality.real_text import NAMES, RELATIONS, TOKENS_PER_SENTENCE


def _facts(text: str) -> dict[str, list[tuple[str, str]]]:
    """Planted facts per relation: ``{relation name: [(person, value), ...]}``."""
    found = {}
    for relation in RELATIONS:
        pattern = re.escape(relation.fact).replace(re.escape("{name}"), r"(\w+)").replace(re.escape("{value}"), r"(\w+)")
        found[relation.name] = re.findall(pattern, text)
    return found


def test_seeded():
    first = real_text_qa(num_documents=2, num_sentences=30, seed=3)
    assert first == real_text_qa(num_documents=2, num_sentences=30, seed=3)
    assert first != real_text_qa(num_documents=2, num_sentences=30, seed=4)
    assert first[0].text != first[1].text


@pytest.mark.parametrize("seed", range(5))
def test_answers_are_planted_facts_with_same_type_distractors(seed):
    for document in real_text_qa(num_documents=2, num_sentences=40, num_questions=12, seed=seed):
        facts = _facts(document.text)
        assert len(document.questions) == 12
        asked_people = set()
        for question in document.questions:
            assert isinstance(question, RealTextQuestion)
            (relation,) = [r for r in RELATIONS if re.fullmatch(
                re.escape(r.question).replace(re.escape("{name}"), r"\w+"), question.question)]
            person = re.search(r"\b(" + "|".join(NAMES) + r")\b", question.question).group(1)
            asked_people.add(person)
            # The answer is stated exactly once, as the fact about this person; the prompt ends with its start.
            fact = relation.fact.format(name=person, value=question.answer)
            assert document.text.count(fact) == 1
            assert fact.startswith(question.answer_prefix + " ")
            assert question_prompt(question).endswith("\nAnswer: " + question.answer_prefix)
            # Same-type distractors: other people with other values of this relation.
            stated = dict(facts[relation.name])
            assert stated[person] == question.answer and len(stated) >= 5
            assert len(set(stated.values())) == len(stated)
            # The choices: distinct values of this relation that occur in the document, answer included.
            assert len(set(question.choices)) == len(question.choices) == 5
            assert set(question.choices) <= set(stated.values())
            assert question.choices[question.answer_index] == question.answer
        assert len(asked_people) == len(document.questions)  # every question asks about someone else
        every_person = [p for pairs in facts.values() for p, _ in pairs]
        assert len(every_person) == len(set(every_person))  # each person has one fact


def test_filler_has_no_values_or_names():
    (document,) = real_text_qa(num_sentences=300, num_questions=5, seed=0)
    facts = sum(len(pairs) for pairs in _facts(document.text).values())
    assert facts == 5
    words = set(re.findall(r"\w+", document.text))
    # Every value word and name in the text comes from a planted fact.
    fact_words = {w for pairs in _facts(document.text).values() for pair in pairs for w in pair}
    vocabulary = {v for r in RELATIONS for v in r.values} | set(NAMES)
    assert (words & vocabulary) <= fact_words
    # And no filler part uses one, whatever the seed.
    parts = " ".join(real_text._TIMES + real_text._SUBJECTS + real_text._ACTIONS + real_text._PLACES
                     + real_text._STATES + real_text._SENTENCES)
    assert not {w.lower() for w in re.findall(r"\w+", parts)} & {w.lower() for w in vocabulary}


def test_fifty_questions_fit_one_document_and_fewer_leave_earlier_documents_as_they_were():
    (document,) = real_text_qa(num_sentences=140, num_questions=50, seed=5)
    assert len(document.questions) == 50 and sum(len(p) for p in _facts(document.text).values()) == 50
    assert {name for name, pairs in _facts(document.text).items() if pairs} == {r.name for r in RELATIONS}
    # The README's example (seed 7): the same document as before the two extra relations existed.
    (example,) = real_text_qa(num_sentences=140, num_questions=1, seed=7)
    assert example.questions[0].question == "What is Julia's favourite sport?" and example.questions[0].answer == "football"


def test_length_grows_with_num_sentences():
    lengths = [len(real_text_qa(num_sentences=n, seed=0)[0].text.split()) for n in (70, 140, 570)]
    assert lengths[0] < lengths[1] < lengths[2]
    # About TOKENS_PER_SENTENCE tokens a sentence; words are ~3/4 of the tokens on this prose.
    approx_tokens = lengths[1] * 4 / 3
    assert 0.7 < approx_tokens / (150 * TOKENS_PER_SENTENCE) < 1.3


def test_prompt_and_choice_format():
    (document,) = real_text_qa(num_sentences=10, num_questions=5, seed=0)
    question = document.questions[0]
    prompt = question_prompt(question)
    assert prompt == f"\n\nQuestion: {question.question}\nAnswer: {question.answer_prefix}"
    assert choice_text("Paris") == " Paris"
    plain = Question("q", "What is it?", ("a", "b"), 0)
    assert question_prompt(plain) == "\n\nQuestion: What is it?\nAnswer:"


@pytest.mark.parametrize(
    "answer_text, expected, correct",
    [
        (" Paris.\nAnswer: Bob", "Paris", True),
        ("paris", "Paris", True),
        (" a teacher, and", "teacher", True),
        ("  The violin!", "violin", True),
        (" Parisian food", "Paris", False),
        (" London.", "Paris", False),
        ("", "Paris", False),
        (" New York is", "New York", True),
        (" New Jersey", "New York", False),
    ],
)
def test_short_answer_correct(answer_text, expected, correct):
    assert short_answer_correct(answer_text, expected) is correct


def test_choices_count_and_fewer_questions():
    (document,) = real_text_qa(num_sentences=20, num_questions=3, num_choices=3, facts_per_relation=4, seed=2)
    assert len(document.questions) == 3
    assert all(len(q.choices) == 3 for q in document.questions)
    assert sum(len(pairs) for pairs in _facts(document.text).values()) == 4  # one relation, 4 people


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"num_documents": 0}, "num_documents"),
        ({"num_sentences": 0}, "num_sentences"),
        ({"num_questions": 0}, "num_questions"),
        ({"num_choices": 1}, "num_choices"),
        ({"num_choices": 6}, "num_choices"),
        ({"facts_per_relation": 1}, "facts_per_relation"),
        ({"facts_per_relation": 11, "num_choices": 5}, "facts_per_relation"),
        ({"num_questions": 51}, "num_questions"),
    ],
)
def test_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        real_text_qa(**kwargs)


def test_batch_qa_prompts_start_with_the_document_ids_and_score_both_ways():
    from transformers import AutoTokenizer

    from sglang_am.batch_qa import documents_and_questions
    from sglang_am.recall_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    documents, document_ids, questions = documents_and_questions(tokenizer, 2, 3, "real-text", size=30, seed=1)
    assert len(questions) == 6 and [q.document for q in questions] == [0, 1, 0, 1, 0, 1]  # interleaved
    for question in questions:
        ids = document_ids[question.document]
        assert question.prompt[: len(ids)] == ids and len(question.prompt) > len(ids)
        assert len(question.choices) == 5 and question.answer_index is not None
        assert question.is_correct(f" {question.answer}. And more") and not question.is_correct(" nothing")
    with pytest.raises(ValueError, match="workload"):
        documents_and_questions(tokenizer, 1, 1, "poetry")
