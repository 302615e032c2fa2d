"""Documents through the chat API on a real SGLang server (loopback): a tiny Qwen3 (the recall model's weights)
whose tokenizer has ChatML's special tokens and a ChatML chat template, the format Qwen3 chats in. A document
registered as leading messages serves ``/v1/chat/completions`` requests that start with them, through the
``openai`` client, with the same tokens and top-5 log-probs as ``/generate`` on the rendered ids; a prompt
that leaves the document only in its last tokens is counted as a boundary miss; bad messages get 400."""

import json
import shutil
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_am.client import http_json
from sglang_am.recall_model import default_model_path, recall_task
from sglang_am.serve import serving

from . import live_server

pytestmark = pytest.mark.slow
KEY = "admin-key"
ok = partial(live_server.ok, key=KEY)
SPECIAL = ["<|im_start|>", "<|im_end|>"]
# Words the recall vocabulary lacks: the roles, and first words that make the next turn's tokens differ.
WORDS = ["system", "user", "assistant", "A", "1", "z"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    source = default_model_path()
    directory = tmp_path_factory.mktemp("chat-model")
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for word in WORDS:
        vocab[word] = len(vocab)
    for token in SPECIAL:
        spec["added_tokens"].append({"id": len(vocab), "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
        vocab[token] = len(vocab)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(source / "tokenizer_config.json", directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.resize_token_embeddings(len(vocab), mean_resizing=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(model_dir):
    flags = ["--model-path", str(model_dir), "--dtype", "float32", "--max-total-tokens", "4096",
             "--admin-api-key", KEY]
    with serving(flags) as url:
        yield url


def test_a_document_registered_as_messages_serves_chat_completions_as_generate_does(server):
    from openai import OpenAI

    (doc,) = recall_task(num_pairs=150, num_questions=4, seed=7)
    system = {"role": "system", "content": doc.text}
    registered = ok(server, "POST", "/am/documents", {"messages": [system], "ratio": 0.5})
    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    for question in doc.questions:
        chat = client.chat.completions.create(
            model="default", messages=[system, {"role": "user", "content": question.question}], max_tokens=4,
            temperature=0, logprobs=True, top_logprobs=5, extra_body={"return_prompt_token_ids": True})
        choice = chat.choices[0].model_dump()
        prompt = choice["prompt_token_ids"]
        generated = ok(server, "POST", "/generate", {
            "input_ids": prompt, "return_logprob": True, "top_logprobs_num": 5, "return_text_in_logprobs": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        meta = generated["meta_info"]
        assert meta["am_document"][0]["doc_id"] == registered["doc_id"]
        assert choice["message"]["content"] == generated["text"]
        assert len(choice["logprobs"]["content"]) == len(meta["output_token_logprobs"]) == 4
        for ours, chosen, theirs in zip(choice["logprobs"]["content"], meta["output_token_logprobs"],
                                        meta["output_top_logprobs"]):
            assert ours["token"] == chosen[2] and ours["logprob"] == pytest.approx(chosen[0], abs=1e-3)
            assert [top["token"] for top in ours["top_logprobs"]] == [text for _, _, text in theirs]
            assert [top["logprob"] for top in ours["top_logprobs"]] == pytest.approx(
                [logprob for logprob, _, _ in theirs], abs=1e-3)
    # Every chat request and every /generate request was served from the document.
    assert ok(server, "GET", f"/am/documents/{registered['doc_id']}")["requests_served"] == 2 * len(doc.questions)
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")


def test_a_prompt_that_leaves_the_document_in_its_last_tokens_is_a_boundary_miss(server, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (doc,) = recall_task(num_pairs=100, num_questions=1, seed=8)
    registered = ok(server, "POST", "/am/documents", {"messages": [{"role": "system", "content": doc.text}],
                                                      "ratio": 0.5})
    # The document ends where the next user turn's content begins: the system turn, then "<|im_start|>user".
    text = tokenizer.apply_chat_template([{"role": "system", "content": doc.text}, {"role": "user", "content": "A"}],
                                         tokenize=False)
    rendered = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(rendered[registered["T"] - 2: registered["T"]]) == ["<|im_start|>", "user"]
    question = tokenizer.encode(doc.questions[0].question, add_special_tokens=False)
    misses = ok(server, "GET", "/am/stats")["counters"].get("fallbacks", {}).get("boundary_miss", 0)
    near = rendered[: registered["T"] - 1] + question  # "user" lost to a merge, say
    served = ok(server, "POST", "/generate", {"input_ids": near, "sampling_params": {"max_new_tokens": 1}})
    assert "am_document" not in served["meta_info"]
    stats = ok(server, "GET", "/am/stats")
    assert stats["counters"]["fallbacks"]["boundary_miss"] == misses + 1
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")


def test_messages_that_render_too_short_or_alongside_text_are_refused_with_the_reason(server):
    short = [{"role": "system", "content": "K100 is 5 ."}]  # 9 tokens with the template's
    status, body = http_json("POST", server + "/am/documents", {"messages": short, "ratio": 0.5}, KEY)
    assert status == 400 and "messages render to a document of" in body["error"], body
    status, body = http_json("POST", server + "/am/documents", {"messages": short, "text": "x", "ratio": 0.5}, KEY)
    assert status == 400 and "exactly one of text, input_ids or messages" in body["error"], body
