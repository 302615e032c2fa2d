"""The project's embedded default model: a tiny Qwen3-architecture model trained on key-value recall.

It is a real transformers checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``) that
any Qwen3 loader reads, SGLang included, so tests, examples and benchmarks have a model whose answers
depend on the document and that needs no download. ``python -m sglang_am.recall_model.train`` rebuilds
it; ``recall_task`` makes documents in its format.
"""

from __future__ import annotations

from pathlib import Path

from ..quality.tasks import WORDS, Document, key_value_recall

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
KEY_RANGE = range(100, 1000)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TEXT_TOKENS = ("What", "is", "the", "value", "of", "Repeat", "previous", "context", ".")


def vocabulary() -> list[str]:
    """Every token the model knows: specials, punctuation and question words, keys, value words."""
    return [*SPECIAL_TOKENS, *TEXT_TOKENS, *(f"K{k}" for k in KEY_RANGE), *WORDS]


def build_tokenizer():
    """Word-level tokenizer: one token per key, value word and question word; a ``<bos>`` is prepended.

    The normaliser drops ':' and '?', so ``K123: word`` is ``K123 word`` and a question ends on its key:
    the answer follows the key as the value does in the document (plain induction; the marks carry
    no information in this task).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(Regex("[:?]"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def recall_task(
    num_documents: int = 1, num_pairs: int = 400, num_questions: int = 20, num_choices: int = 5, seed: int = 0
) -> list[Document]:
    """Key-value recall documents in the model's vocabulary (keys ``K100``..``K999``; 2 tokens per pair)."""
    return key_value_recall(
        num_documents=num_documents,
        num_pairs=num_pairs,
        num_questions=num_questions,
        num_choices=num_choices,
        seed=seed,
        key_range=KEY_RANGE,
    )


def default_model_path() -> Path:
    """Directory of the committed checkpoint; raises if it is missing (rebuild it with the train script)."""
    if not (CHECKPOINT_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no recall-model checkpoint in {CHECKPOINT_DIR}; run `python -m sglang_am.recall_model.train`"
        )
    return CHECKPOINT_DIR


def load_recall_model(dtype=None):
    """``(model, tokenizer)`` of the committed checkpoint, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


__all__ = [
    "CHECKPOINT_DIR",
    "KEY_RANGE",
    "build_tokenizer",
    "default_model_path",
    "load_recall_model",
    "recall_task",
    "vocabulary",
]
