"""Seeded real-text QA: natural-language documents with planted facts about people.

Each document is varied filler prose with planted facts such as "Alice's favourite city is Paris." or
"Bob plays the violin."; every relation is stated for several people, so each fact has same-type
distractors elsewhere in the document and a question can only be answered by binding the person to the
value, not by recognising a value. Values are familiar words (cities, instruments, car colours, pets,
jobs, sports, fruits, languages, flowers, drinks): a 270M model binds those far better than numbers.

Every question serves two scorings, both after ``document.text + question_prompt(q)``:

* multiple choice by answer likelihood: the summed log-probability of ``choice_text(c)`` for each
  choice ``c`` of ``q.choices`` (same-type values that occur in the document);
* short answer by greedy generation: a few greedy tokens, judged by ``short_answer_correct(text, q.answer)``.

The prompt is "Question: <question>\nAnswer: <answer prefix>", where the answer prefix restates the fact
up to its value ("Alice's favourite city is"): Gemma-3-270M (base) answers a bare "Answer:" at chance
level (it tends to repeat the question), but completes the restated fact from the document.

``num_sentences`` sets the length: about :data:`TOKENS_PER_SENTENCE` Gemma-3 tokens a sentence (the
planted facts included), so 70 sentences give ~1k tokens, 140 ~2k, 425 ~6k and 570 ~8k.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

from .tasks import Document, Question, _check_counts

TOKENS_PER_SENTENCE = 14  # measured with the Gemma-3 tokenizer (13-14 from 1k to 8k tokens, facts included)

NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Louis Maria Nathan Olivia Peter Rachel "
    "Samuel Tina Victor Wendy Oscar Laura Hannah George Julia Kevin Lucy Martin Nina Paul Rosa Simon Sophie "
    "Thomas Walter Zoe Daniel Helen Ivan James Linda Mark Philip Ruth Steven Anna Brian Clara Edward Fiona"
).split()


@dataclass(frozen=True)
class Relation:
    """One fact type: the fact sentence, the question and the same-type values it draws from."""

    name: str
    fact: str  # format with {name} and {value}; the value ends the sentence
    question: str  # format with {name}
    values: tuple[str, ...]

    def answer_prefix(self, name: str) -> str:
        """The fact sentence up to (not including) the space before its value."""
        return self.fact.split(" {value}")[0].format(name=name)

    def fact_sentence(self, name: str, value: str) -> str:
        return self.fact.format(name=name, value=value)


@dataclass(frozen=True)
class RealTextQuestion(Question):
    """A :class:`Question` that also carries the start of its answer sentence (see :func:`question_prompt`)."""

    answer_prefix: str = ""


RELATIONS = (
    Relation(
        "city", "{name}'s favourite city is {value}.", "What is {name}'s favourite city?",
        tuple("Paris London Rome Tokyo Berlin Madrid Vienna Cairo Dublin Lisbon Moscow Athens Prague Sydney "
              "Chicago Boston".split()),
    ),
    Relation(
        "instrument", "{name} plays the {value}.", "Which instrument does {name} play?",
        tuple("piano violin guitar flute trumpet drums cello harp saxophone clarinet banjo accordion".split()),
    ),
    Relation(
        "car", "{name} drives a {value} car.", "What colour is {name}'s car?",
        tuple("red blue green yellow black white silver purple brown pink".split()),
    ),
    Relation(
        "pet", "{name} has a pet {value}.", "What kind of pet does {name} have?",
        tuple("dog cat parrot rabbit hamster turtle goldfish snake pony lizard".split()),
    ),
    Relation(
        "job", "{name} works as a {value}.", "What is {name}'s job?",
        tuple("teacher doctor nurse lawyer pilot farmer baker painter dentist chef plumber "
              "journalist".split()),
    ),
    Relation(
        "sport", "{name}'s favourite sport is {value}.", "What is {name}'s favourite sport?",
        tuple("tennis football golf swimming hockey baseball rugby cricket cycling skiing boxing".split()),
    ),
    Relation(
        "fruit", "{name}'s favourite fruit is the {value}.", "What is {name}'s favourite fruit?",
        tuple("apple banana mango cherry peach grape pear lemon plum strawberry pineapple".split()),
    ),
    Relation(
        "language", "{name} speaks {value}.", "Which language does {name} speak?",
        tuple("French German Spanish Italian Russian Japanese Chinese Arabic Greek Dutch Polish Swedish".split()),
    ),
    # Used only by documents that need more than the first eight (up to 50 questions at 5 facts a relation),
    # so the documents of every earlier seed and size stay as they were.
    Relation(
        "flower", "{name}'s favourite flower is the {value}.", "What is {name}'s favourite flower?",
        tuple("tulip daisy lily orchid sunflower poppy lavender iris peony magnolia".split()),
    ),
    Relation(
        "drink", "{name}'s favourite drink is {value}.", "What is {name}'s favourite drink?",
        tuple("coffee tea milk cocoa lemonade cider juice soda espresso wine".split()),
    ),
)
_FIRST_RELATIONS = 8

# Filler prose: templates with interchangeable parts plus fixed sentences. None of it names a person or
# uses a value word, so the planted facts are the only place where values occur.
_TIMES = (
    "In the morning", "Later that afternoon", "On Tuesday", "Early in the week", "After lunch",
    "Before the storm", "Late in the evening", "At the end of the month", "During the summer", "That winter",
    "Just after sunrise", "On a quiet Sunday", "Some years ago", "Around noon", "Once the rain had stopped",
)
_SUBJECTS = (
    "a neighbour", "the committee", "a group of students", "the mayor", "two travellers", "an old man",
    "the shopkeeper", "a young woman", "the visitors", "the gardener", "a tired clerk", "the new owner",
    "a small crowd", "the caretaker", "several families", "the postman",
)
_ACTIONS = (
    "walked slowly along the river", "sat quietly in the park", "waited outside the station",
    "talked for an hour near the market", "read the newspaper at a corner table",
    "cleaned the windows of the shop", "repaired the fence behind the school", "planted flowers beside the road",
    "carried heavy boxes up the hill", "looked at the clouds over the harbour", "counted the chairs in the hall",
    "painted the door of the old barn", "swept the leaves from the square", "crossed the bridge without a word",
    "climbed the steps to the museum", "wrote a long letter about the weather",
)
_PLACES = (
    "the library", "the town hall", "the bakery on the corner", "the train station", "the old mill",
    "the harbour", "the village school", "the market square", "the small museum", "the post office",
    "the hotel by the lake", "the community garden",
)
_STATES = (
    "was busier than usual", "stayed closed for repairs", "smelled of fresh paint", "was full of quiet voices",
    "looked smaller than anyone remembered", "needed a new roof", "was decorated for the festival",
    "had a long queue outside", "was lit by a single lamp", "seemed empty for most of the day",
)
_SENTENCES = (
    "The morning was quiet and the streets were still wet from the rain.",
    "Nobody in the small town remembered when the clock tower had last been repaired.",
    "The river rose a little every spring, but it rarely reached the houses.",
    "An old map on the wall showed roads that no longer existed.",
    "The wind carried the smell of bread and wood smoke across the square.",
    "A long report described the weather of the previous week in great detail.",
    "Most of the shops closed early because of the holiday.",
    "The path through the woods was narrow and covered with moss.",
    "For a while nothing happened, and the afternoon passed slowly.",
    "The meeting ended without a decision, as such meetings often did.",
    "Somewhere down the road a gate creaked in the wind.",
    "The council promised to fix the broken street lamps before autumn.",
    "Snow fell overnight and covered the fields in a thin, soft layer.",
    "The lights in the windows went out one by one.",
    "Everyone agreed that the summer had been unusually warm.",
    "A heavy cart rolled slowly over the cobblestones.",
    "The bells of the church rang twice and then fell silent.",
    "People said the bridge was older than the town itself.",
    "The stairs creaked loudly whenever anyone went up to the attic.",
    "By evening the sky had cleared and the first stars appeared.",
)


def _filler_sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{rng.choice(_TIMES)}, {rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)}."
    if kind == 1:
        subject = rng.choice(_SUBJECTS)
        return f"{subject[0].upper()}{subject[1:]} {rng.choice(_ACTIONS)}, not far from {rng.choice(_PLACES)}."
    if kind == 2:
        place = rng.choice(_PLACES)
        return f"{rng.choice(_TIMES)}, {place} {rng.choice(_STATES)}."
    return rng.choice(_SENTENCES)


def question_prompt(question: Question) -> str:
    """The text appended after the document for ``question``: "\\n\\nQuestion: <question>\\nAnswer:" and,
    for a :class:`RealTextQuestion`, " <answer prefix>" (e.g. " Alice's favourite city is")."""
    prefix = getattr(question, "answer_prefix", "")
    return f"\n\nQuestion: {question.question}\nAnswer:" + (f" {prefix}" if prefix else "")


def choice_text(choice: str) -> str:
    """The continuation scored for one multiple-choice option, right after :func:`question_prompt`."""
    return " " + choice


_ARTICLES = {"a", "an", "the"}


def _normalise_words(text: str) -> list[str]:
    words = [w.strip(string.punctuation) for w in text.strip().lower().split()]
    return [w for w in words if w]


def short_answer_correct(answer_text: str, expected: str) -> bool:
    """Whether a generated answer starts with ``expected``: both lower-cased with punctuation stripped,
    a leading article ("a", "an", "the") in the answer skipped, then the answer's first words (as many
    as ``expected`` has) compared."""
    want = _normalise_words(expected)
    got = _normalise_words(answer_text)
    if got and got[0] in _ARTICLES and want and want[0] not in _ARTICLES:
        got = got[1:]
    return bool(want) and got[: len(want)] == want


def answer_mentions(answer_text: str, expected: str) -> bool:
    """Whether ``expected``'s words occur, in order and together, anywhere in a generated answer (lower-cased,
    punctuation stripped): a chat model restates the question before the value."""
    return f" {' '.join(_normalise_words(expected))} " in f" {' '.join(_normalise_words(answer_text))} "


def real_text_qa(
    num_documents: int = 1,
    num_sentences: int = 140,
    num_questions: int = 10,
    num_choices: int = 5,
    facts_per_relation: int = 5,
    seed: int = 0,
) -> list[Document]:
    """Documents of ``num_sentences`` filler sentences with planted facts, and ``num_questions`` questions.

    Facts come in relations (favourite city, instrument, ...), each stated for ``facts_per_relation``
    different people with distinct values, so every fact has ``facts_per_relation - 1`` same-type
    distractors in the document; ``ceil(num_questions / facts_per_relation)`` relations are used and
    each question asks about a different person. The choices are ``num_choices`` distinct values of the
    asked relation that occur in the document (so ``num_choices <= facts_per_relation``). Questions are
    :class:`RealTextQuestion` s whose ``answer_prefix`` restates the fact up to the value.
    """
    _check_counts(
        num_documents=num_documents, num_sentences=num_sentences, num_questions=num_questions,
        facts_per_relation=facts_per_relation,
    )
    smallest_pool = min(len(r.values) for r in RELATIONS)
    if not 2 <= facts_per_relation <= smallest_pool:
        raise ValueError(f"facts_per_relation must be in [2, {smallest_pool}], got {facts_per_relation}")
    if not 2 <= num_choices <= facts_per_relation:
        raise ValueError(f"num_choices must be in [2, facts_per_relation], got {num_choices}")
    num_relations = math.ceil(num_questions / facts_per_relation)
    if num_relations > len(RELATIONS) or num_relations * facts_per_relation > len(NAMES):
        most = min(len(RELATIONS) * facts_per_relation, len(NAMES) // facts_per_relation * facts_per_relation)
        raise ValueError(f"num_questions must be <= {most} with facts_per_relation={facts_per_relation}, got {num_questions}")
    rng = random.Random(seed)
    documents = []
    pool = RELATIONS[:_FIRST_RELATIONS] if num_relations <= _FIRST_RELATIONS else RELATIONS
    for d in range(num_documents):
        relations = rng.sample(pool, num_relations)
        names = iter(rng.sample(NAMES, num_relations * facts_per_relation))
        facts = []  # (relation, name, value)
        for relation in relations:
            values = rng.sample(relation.values, facts_per_relation)
            facts.extend((relation, next(names), value) for value in values)
        sentences = [_filler_sentence(rng) for _ in range(num_sentences)]
        for relation, name, value in facts:
            sentences.insert(rng.randrange(len(sentences) + 1), relation.fact_sentence(name, value))
        # Ask round-robin over the relations so every relation gets questions.
        by_relation = [rng.sample(facts[i * facts_per_relation : (i + 1) * facts_per_relation], facts_per_relation)
                       for i in range(num_relations)]
        asked = [group[i] for i in range(facts_per_relation) for group in by_relation][:num_questions]
        questions = []
        for q, (relation, name, value) in enumerate(asked):
            same_type = [v for r, _, v in facts if r is relation and v != value]
            choices = [value, *rng.sample(same_type, num_choices - 1)]
            rng.shuffle(choices)
            questions.append(RealTextQuestion(
                f"real-{seed}-{d}-{q}", relation.question.format(name=name), tuple(choices), choices.index(value),
                relation.answer_prefix(name),
            ))
        documents.append(Document(f"real-{seed}-{d}", " ".join(sentences), tuple(questions)))
    return documents
