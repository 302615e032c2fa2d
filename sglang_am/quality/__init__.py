"""Quality harness: multiple-choice documents from seeded synthetic tasks or published datasets."""

from .datasets import load_longhealth, load_quality
from .real_text import RealTextQuestion, answer_mentions, choice_text, question_prompt, real_text_qa, short_answer_correct
from .tasks import Document, Question, key_value_recall, needle_in_document

__all__ = [
    "Document",
    "Question",
    "RealTextQuestion",
    "choice_text",
    "key_value_recall",
    "load_longhealth",
    "load_quality",
    "needle_in_document",
    "question_prompt",
    "real_text_qa",
    "short_answer_correct",
    "answer_mentions",
]
