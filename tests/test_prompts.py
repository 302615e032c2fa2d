"""Prompt pieces around a document, with and without a chat template."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from sglang_am.hf import REPEAT_INSTRUCTION, document_prompt, instruction_ids, repeat_ids

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tokenizer():
    words = "the lamp is lit at nine Repeat previous context . ? what time".split()
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|end|>", "<|assistant|>"]
    vocab = {token: index for index, token in enumerate(specials + words)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|end|>", "<|assistant|>"],
    )
    return tokenizer


def test_plain_tokenizer_keeps_bos_as_head_and_appends_instructions(tokenizer):
    prompt = document_prompt(tokenizer, "the lamp is lit at nine")
    assert prompt.input_ids == [tokenizer.bos_token_id] + tokenizer.encode("the lamp is lit at nine", add_special_tokens=False)
    assert prompt.keep_first == 1
    assert repeat_ids(tokenizer) == tokenizer.encode(REPEAT_INSTRUCTION, add_special_tokens=False)


def test_chat_template_splits_into_head_document_and_turn_end(tokenizer):
    tokenizer.chat_template = TEMPLATE
    document = "the lamp is lit at nine"
    prompt = document_prompt(tokenizer, document)
    head = prompt.input_ids[: prompt.keep_first]
    assert tokenizer.convert_ids_to_tokens(head) == ["<bos>", "<|user|>"]
    question = instruction_ids(tokenizer, " what time ?")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": document + " what time ?"}], tokenize=False, add_generation_prompt=True
    )
    # The pieces concatenate to the template's own rendering of the whole request.
    assert prompt.input_ids + question == tokenizer.encode(rendered, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(question)[-2:] == ["<|end|>", "<|assistant|>"]
    repeat = tokenizer.convert_ids_to_tokens(repeat_ids(tokenizer))
    assert repeat == ["Repeat", "the", "previous", "context", ".", "<|end|>", "<|assistant|>"]


def test_template_that_rewrites_the_message_is_refused(tokenizer):
    tokenizer.chat_template = "{{ messages[0]['content'] | upper }}"
    with pytest.raises(ValueError, match="verbatim"):
        instruction_ids(tokenizer, "what time ?")
