"""Seeded synthetic long-document tasks with multiple-choice questions.

Both tasks plant facts of one type many times, so a question can only be answered by attending to the
right spot: *key-value recall* (a list of ``key: value`` lines) and *needle in a document* (one fact per
question hidden in filler sentences that also carry same-type distractor facts). The same seed gives
the same documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = (
    "apple amber anchor arrow badge basket beacon bell birch blade bloom bottle breeze brick bridge brook "
    "cabin camel candle canyon carpet castle cedar chalk cherry circle cliff clock cloud comet copper coral "
    "cotton crane crown crystal daisy desert dolphin dragon drum eagle ember engine falcon feather fern "
    "field flame flute forest fossil garden garnet glacier globe granite harbor harp hawk hazel helmet "
    "honey horizon island ivory jacket jade jungle kettle kite ladder lagoon lantern lemon lily lotus "
    "magnet maple marble meadow melon mirror moss mountain needle nest oak ocean olive orbit orchid otter "
    "paddle palace panther pebble pepper pillow pine planet plum pond prism quartz quill rabbit raven reef "
    "ribbon river robin rocket saddle salmon sand satin shell silver sparrow spider spruce star stone "
    "storm summit swan temple thistle thunder tiger timber torch tower tulip valley velvet violet walnut "
    "willow window winter wolf zebra"
).split()
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown")
FILLER = (
    "The morning was quiet and the streets were still wet from the rain.",
    "Several visitors walked slowly along the old stone wall near the market.",
    "A long report described the weather of the previous week in detail.",
    "Nobody in the small town remembered when the clock tower had last been repaired.",
    "The committee met again to discuss the schedule for the coming season.",
    "Children played near the fountain while their parents talked about work.",
    "The library kept its oldest books in a cool room behind the reading hall.",
    "A delivery truck stopped in front of the bakery shortly after sunrise.",
    "The river rose a little every spring, but it rarely reached the houses.",
    "An old map on the wall showed roads that no longer existed.",
)


@dataclass(frozen=True)
class Question:
    question_id: str
    question: str
    choices: tuple[str, ...]
    answer_index: int | None  # None where the dataset publishes no label

    @property
    def answer(self) -> str | None:
        return None if self.answer_index is None else self.choices[self.answer_index]


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    questions: tuple[Question, ...]


def _choices(rng: random.Random, answer: str, pool: list[str], count: int) -> tuple[tuple[str, ...], int]:
    distractors = rng.sample([item for item in pool if item != answer], count - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return tuple(choices), choices.index(answer)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def key_value_recall(
    num_documents: int = 1,
    num_pairs: int = 200,
    num_questions: int = 20,
    num_choices: int = 5,
    seed: int = 0,
    key_range: range = range(1000, 10000),
) -> list[Document]:
    """Documents of ``num_pairs`` lines ``K1234: word``; each question asks for the word of one key.

    Keys are distinct numbers from ``key_range``; distractor choices are words that appear elsewhere in
    the same document.
    """
    _check_counts(num_documents=num_documents, num_pairs=num_pairs, num_questions=num_questions)
    if num_pairs > len(key_range):
        raise ValueError(f"num_pairs ({num_pairs}) cannot exceed len(key_range) ({len(key_range)})")
    if not 2 <= num_choices <= min(num_pairs, len(WORDS)):
        raise ValueError(f"num_choices must be in [2, min(num_pairs, {len(WORDS)})], got {num_choices}")
    if num_questions > num_pairs:
        raise ValueError(f"num_questions ({num_questions}) cannot exceed num_pairs ({num_pairs})")
    rng = random.Random(seed)
    documents = []
    for d in range(num_documents):
        keys = [f"K{number}" for number in rng.sample(key_range, num_pairs)]
        # At least num_choices distinct words, so every question has enough in-document distractors.
        values = rng.sample(WORDS, num_choices) + [rng.choice(WORDS) for _ in range(num_pairs - num_choices)]
        rng.shuffle(values)
        text = "\n".join(f"{key}: {value}" for key, value in zip(keys, values))
        questions = []
        for q, index in enumerate(rng.sample(range(num_pairs), num_questions)):
            choices, answer = _choices(rng, values[index], sorted(set(values)), num_choices)
            questions.append(Question(f"kv-{seed}-{d}-{q}", f"What is the value of {keys[index]}?", choices, answer))
        documents.append(Document(f"kv-{seed}-{d}", text, tuple(questions)))
    return documents


def needle_in_document(
    num_documents: int = 1,
    num_sentences: int = 120,
    num_questions: int = 10,
    num_choices: int = 5,
    seed: int = 0,
) -> list[Document]:
    """Filler text with ``num_questions`` planted facts "The <colour> <thing> is kept in room <n>."

    Every fact is a needle for one question; the other facts are its same-type distractors, and the
    choices are room numbers that occur in the document.
    """
    _check_counts(num_documents=num_documents, num_sentences=num_sentences, num_questions=num_questions)
    if num_questions > len(COLORS) * len(WORDS):
        raise ValueError(f"num_questions must be <= {len(COLORS) * len(WORDS)}, got {num_questions}")
    if not 2 <= num_choices <= num_questions:
        raise ValueError(f"num_choices must be in [2, num_questions], got {num_choices}")
    rng = random.Random(seed)
    documents = []
    for d in range(num_documents):
        things = rng.sample([(c, w) for c in COLORS for w in WORDS], num_questions)
        rooms = [str(room) for room in rng.sample(range(100, 1000), num_questions)]
        sentences = [rng.choice(FILLER) for _ in range(num_sentences)]
        for (colour, thing), room in zip(things, rooms):
            sentences.insert(rng.randrange(len(sentences) + 1), f"The {colour} {thing} is kept in room {room}.")
        questions = []
        for q, ((colour, thing), room) in enumerate(zip(things, rooms)):
            choices, answer = _choices(rng, room, rooms, num_choices)
            questions.append(
                Question(f"needle-{seed}-{d}-{q}", f"In which room is the {colour} {thing} kept?", choices, answer)
            )
        documents.append(Document(f"needle-{seed}-{d}", " ".join(sentences), tuple(questions)))
    return documents
