"""The bias-aware ``triton`` attention backend in a real SGLang server on loopback (the embedded recall
model, float32). Without CUDA, SGLang's Triton extend/decode kernels, with our ``score_mod``, run under
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in ``conftest.py``). Registration
(query capture), extend and decode with documents are checked against the transformers adapter."""

from functools import partial

import pytest
import torch

from sglang_am.client import http_json
from sglang_am.hf import forward_after_prefix
from sglang_am.prefix import CompactedPrefix
from sglang_am.recall_model import load_recall_model, recall_task
from sglang_am.serve import serving

from . import live_server
from .live_server import STRICT_CHECKS

pytestmark = pytest.mark.slow
FLAGS = ["--max-total-tokens", "8192", "--dtype", "float32", "--attention-backend", "triton"]
BIAS_SLOTS = 100  # room for the documents these tests keep at once: a third one is refused
KEY = "admin-key"  # the store's routes need the server's admin key
STEPS = 3
ok = partial(live_server.ok, key=KEY)


@pytest.fixture(scope="module")
def server(store_dir):
    flags = [*FLAGS, "--am-bias-slots", str(BIAS_SLOTS), "--am-store-dir", str(store_dir), "--admin-api-key", KEY]
    with serving(flags, env=STRICT_CHECKS) as url:
        yield url


@pytest.fixture(scope="module")
def model():
    return load_recall_model()[0]


def register(server, tokenizer, store_dir, seed, ratio):
    (doc,) = recall_task(num_pairs=300, num_questions=2, seed=seed)
    ids = tokenizer.encode(doc.text)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": ratio, "query_source": "context-prefill"})
    ok(server, "POST", f"/am/documents/{registered['doc_id']}/save")
    prompts = [tokenizer.encode(f"{doc.text}\n{q.question}") for q in doc.questions]
    (stored,) = store_dir.glob(f"*/{registered['doc_id']}.safetensors")
    return registered, CompactedPrefix.load(stored), prompts


def generate(server, prompts):
    sampling = {"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    return ok(server, "POST", "/generate", {"input_ids": prompts, "sampling_params": sampling,
                                            "return_logprob": True, "top_logprobs_num": 20})


def served_document(output) -> str | None:
    entries = output["meta_info"].get("am_document") or [None]
    return entries[0]["doc_id"] if entries[0] else None


def assert_matches(model, output, reference_logits):
    """Each generated step's top log-probabilities against ``reference_logits(tokens so far)``."""
    for step in range(STEPS):
        reference = torch.log_softmax(reference_logits(output["output_ids"][:step]).double(), dim=-1)
        served = output["meta_info"]["output_top_logprobs"][step]
        assert served[0][1] == int(reference.argmax())
        assert max(abs(value - reference[token].item()) for value, token, _ in served) < 2e-3


def test_documents_and_plain_prompts_in_one_batch_match_the_transformers_adapter(server, tokenizer, model, store_dir):
    first, first_prefix, first_prompts = register(server, tokenizer, store_dir, seed=21, ratio=0.1)
    second, second_prefix, second_prompts = register(server, tokenizer, store_dir, seed=22, ratio=0.05)
    plain = tokenizer.encode("a prompt that starts with no document")
    outputs = generate(server, [first_prompts[0], plain, second_prompts[0], first_prompts[1]])
    assert [served_document(out) for out in outputs] == [first["doc_id"], None, second["doc_id"], first["doc_id"]]

    def after_document(prefix, prompt):
        suffix = prompt[prefix.logical_length:]
        return lambda generated: forward_after_prefix(model, prefix, torch.tensor([suffix + generated]))[0][0, -1]

    def plain_model(generated):
        with torch.no_grad():
            return model(torch.tensor([plain + generated])).logits[0, -1]

    references = [after_document(first_prefix, first_prompts[0]), plain_model,
                  after_document(second_prefix, second_prompts[0]), after_document(first_prefix, first_prompts[1])]
    for output, reference in zip(outputs, references):
        assert_matches(model, output, reference)

    # The bias table holds BIAS_SLOTS compacted slots: the two documents use 60 + 30.
    (doc,) = recall_task(num_pairs=300, num_questions=1, seed=23)
    status, body = http_json("POST", server + "/am/documents", {"input_ids": tokenizer.encode(doc.text), "ratio": 0.1}, KEY)
    assert status == 503 and "--am-bias-slots" in body["error"], body
    for registered in (first, second):
        ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")
    # The dropped documents' room comes back.
    third, third_prefix, third_prompts = register(server, tokenizer, store_dir, seed=23, ratio=0.1)
    assert_matches(model, generate(server, third_prompts[:1])[0], after_document(third_prefix, third_prompts[0]))
    ok(server, "DELETE", f"/am/documents/{third['doc_id']}")
