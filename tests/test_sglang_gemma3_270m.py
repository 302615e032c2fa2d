"""The real pretrained Gemma-3-270M (18 layers, 15 with a 512-token sliding window) in a real SGLang server,
float32, against stock SGLang and the transformers adapter (slow: each server takes about a minute to
start). Written once as a plain transformers directory by the launcher's ``--model gemma3-270m``. The base
model has no chat template: the server gets Gemma's turn format through SGLang's ``--chat-template``."""

import pytest
import torch

from sglang_am.client import http_json
from sglang_am.hf import forward_after_prefix
from sglang_am.hf.gemma import gemma3_270m_directory, load_gemma3_270m
from sglang_am.prefix import CompactedPrefix
from sglang_am.quality import needle_in_document
from sglang_am.serve import server_process

from .live_server import side_by_side

pytestmark = pytest.mark.slow
FLAGS = ["--dtype", "float32", "--max-total-tokens", "16384"]
KEY = "admin-key"
STEPS = 4
WINDOW = 512
# Gemma's turn format: a system message opens the first user turn (the format has no system role).
GEMMA_CHAT = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' + ns.system"
    " + message['content'] + '<end_of_turn>\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = load_gemma3_270m(gemma3_270m_directory())
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(gemma):
    """A ~900-token document, a question after it, and a 600-token suffix that moves every window past it."""
    _, tokenizer = gemma
    (doc,) = needle_in_document(num_sentences=60, num_questions=6, seed=3)
    document = tokenizer.encode(doc.text)
    question = tokenizer.encode(f"\nQuestion: {doc.questions[0].question}\nAnswer: room", add_special_tokens=False)
    (far,) = needle_in_document(num_sentences=45, num_questions=6, seed=4)
    long_suffix = tokenizer.encode(" " + far.text, add_special_tokens=False)[:600] + question
    assert len(document) > WINDOW and len(long_suffix) > WINDOW
    return document, [question, long_suffix]


def generate(server, document, suffixes):
    sampling = {"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    return http_json("POST", server + "/generate", {
        "input_ids": [document + suffix for suffix in suffixes], "sampling_params": sampling, "return_logprob": True,
        "top_logprobs_num": 5, "logprob_start_len": len(document),
    }, KEY)[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Stock SGLang and the extension (its store), started side by side."""
    store = tmp_path_factory.mktemp("store")
    template = tmp_path_factory.mktemp("template") / "gemma.jinja"
    template.write_text(GEMMA_CHAT)
    with side_by_side(server_process(["--model-path", str(gemma3_270m_directory()), *FLAGS], stock=True),
                      server_process(["--model", "gemma3-270m", *FLAGS, "--admin-api-key", KEY, "--am-store-dir",
                                      str(store), "--chat-template", str(template)])) as (stock, url):
        yield stock, url, store


@pytest.fixture(scope="module")
def stock_outputs(servers, prompts):
    document, suffixes = prompts
    return generate(servers[0], document, suffixes)


@pytest.fixture(scope="module")
def server(servers):
    _, url, store = servers
    return url, store


def register(server, document, ratio):
    status, body = http_json("POST", server + "/am/documents", {"input_ids": document, "ratio": ratio}, KEY)
    assert status == 200, body
    return body


def max_gap(served, reference) -> float:
    """The largest difference between two outputs' prompt and top-5 output log-probs (same tokens)."""
    gaps = []
    for mine, theirs in zip(served["meta_info"]["input_token_logprobs"][1:], reference["meta_info"]["input_token_logprobs"][1:]):
        assert mine[1] == theirs[1]
        gaps.append(abs(mine[0] - theirs[0]))
    for mine, theirs in zip(served["meta_info"]["output_top_logprobs"], reference["meta_info"]["output_top_logprobs"]):
        assert [token for _, token, _ in mine] == [token for _, token, _ in theirs]
        gaps += [abs(a[0] - b[0]) for a, b in zip(mine, theirs)]
    return max(gaps)


def test_identity_document_serves_what_stock_sglang_serves(server, prompts, stock_outputs):
    url, _ = server
    document, suffixes = prompts
    # No document: the extension's attention path (new tokens' queries only, window layers' windows only).
    for served, stock in zip(generate(url, document, suffixes), stock_outputs):
        assert "am_document" not in served["meta_info"] and served["output_ids"] == stock["output_ids"]
        assert max_gap(served, stock) < 1e-4
    registered = register(url, document, 1.0)
    assert registered["slots"] == len(document)
    outputs = generate(url, document, suffixes)
    http_json("DELETE", f"{url}/am/documents/{registered['doc_id']}", None, KEY)
    for served, stock in zip(outputs, stock_outputs):
        assert served["meta_info"]["am_document"][0]["doc_id"] == registered["doc_id"]
        assert served["output_ids"] == stock["output_ids"]
        assert max_gap(served, stock) < 1e-3


def test_a_tenth_of_the_document_matches_the_transformers_adapter(server, prompts, gemma):
    url, store = server
    model, _ = gemma
    document, suffixes = prompts
    registered = register(url, document, 0.1)
    # Global layers hold 10% of the document, window layers its last 511 tokens: one node of 511 slots.
    assert registered["slots"] == WINDOW - 1 > round(0.1 * len(document))
    slot_bytes = 2 * 256 * 4
    assert registered["kv_bytes"] == {"global": 3 * 511 * slot_bytes, "sliding": 15 * 511 * slot_bytes,
                                      "total": 18 * 511 * slot_bytes, "uncompacted": 18 * len(document) * slot_bytes}
    assert http_json("POST", f"{url}/am/documents/{registered['doc_id']}/save", None, KEY)[0] == 200
    outputs = generate(url, document, suffixes)
    (stored,) = store.glob(f"*/{registered['doc_id']}.safetensors")
    prefix = CompactedPrefix.load(stored)
    for suffix, output in zip(suffixes, outputs):
        meta = output["meta_info"]
        logits, _ = forward_after_prefix(model, prefix, torch.tensor([suffix + output["output_ids"]]))
        reference = torch.log_softmax(logits[0].double(), dim=-1)
        prompt = meta["input_token_logprobs"]
        assert [token for _, token, _ in prompt] == suffix
        assert max(abs(value - reference[i, token].item()) for i, (value, token, _) in enumerate(prompt[1:])) < 2e-3
        for step, served in enumerate(meta["output_top_logprobs"]):
            row = reference[len(suffix) - 1 + step]
            assert served[0][1] == int(row.argmax())
            assert max(abs(value - row[token].item()) for value, token, _ in served) < 2e-3
    http_json("DELETE", f"{url}/am/documents/{registered['doc_id']}", None, KEY)


def test_a_system_message_registered_through_the_chat_template_serves_chat_completions(server):
    url, _ = server
    (doc,) = needle_in_document(num_sentences=40, num_questions=6, seed=5)
    system = {"role": "system", "content": doc.text}
    status, registered = http_json("POST", url + "/am/documents", {"messages": [system], "ratio": 0.1}, KEY)
    assert status == 200, registered
    questions = doc.questions[:3]
    for question in questions:
        status, chat = http_json("POST", url + "/v1/chat/completions", {
            "messages": [system, {"role": "user", "content": question.question}], "max_tokens": STEPS,
            "temperature": 0, "logprobs": True, "top_logprobs": 5, "return_prompt_token_ids": True}, KEY)
        assert status == 200, chat
        choice = chat["choices"][0]
        status, generated = http_json("POST", url + "/generate", {
            "input_ids": choice["prompt_token_ids"], "return_logprob": True, "top_logprobs_num": 5,
            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": STEPS, "temperature": 0}}, KEY)
        meta = generated["meta_info"]
        assert meta["am_document"][0]["doc_id"] == registered["doc_id"]
        assert choice["message"]["content"] == generated["text"]
        for ours, chosen in zip(choice["logprobs"]["content"], meta["output_token_logprobs"]):
            assert ours["token"] == chosen[2] and ours["logprob"] == pytest.approx(chosen[0], abs=1e-3)
    status, described = http_json("GET", f"{url}/am/documents/{registered['doc_id']}", None, KEY)
    assert described["requests_served"] == 2 * len(questions)  # the chat requests too
    http_json("DELETE", f"{url}/am/documents/{registered['doc_id']}", None, KEY)
