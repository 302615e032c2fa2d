"""Hybrid sliding-window models in a real SGLang server: a tiny random-weight Gemma-3 (window 8, two of
its four layers global), float32, on ``torch_native`` and on ``triton`` (SGLang's kernels and our
``score_mod`` under Triton's interpreter). A document registered and saved by the server must give what
the transformers adapter gives for the same ``CompactedPrefix``, also once the suffix and the answer have
moved the window past the document, with the windows verbatim or compacted; prompt log-probs line up
with the client's tokens; the node's bytes are reported per layer type."""

from functools import partial

import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from sglang_am.client import http_json
from sglang_am.hf import forward_after_prefix, use_sglang_am_attention
from sglang_am.prefix import CompactedPrefix
from sglang_am.recall_model import default_model_path
from sglang_am.serve import serving

from . import live_server

pytestmark = pytest.mark.slow
WINDOW = 8  # transformers' sliding_window: a token sees the 7 before it (SGLang's sliding_window_size)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
KEY = "admin-key"
ok = partial(live_server.ok, key=KEY)
STEPS = 12  # decode steps: longer than the window, so the answer's window leaves the document


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Gemma-3 with the recall model's tokenizer, written as a transformers directory."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=1024,
        layer_types=LAYER_TYPES, pad_token_id=tokenizer.pad_token_id or 0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # random weights give near-flat logits; sharper ones make argmax checks meaningful
        model.model.embed_tokens.weight.mul_(30)
    directory = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return use_sglang_am_attention(Gemma3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


def ids(length, seed):
    return torch.randint(5, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("backend", "compact_windows"), [("torch_native", False), ("triton", False),
                                                          ("torch_native", True)])
def test_a_served_document_matches_the_transformers_adapter_past_the_window(model_dir, model, backend,
                                                                           compact_windows, tmp_path):
    # Verbatim windows: 10 compacted slots, 7 window tokens. Compacted windows: 4 slots on every layer.
    ratio, layer_slots = (0.1, [4, 4, 4, 4]) if compact_windows else (0.25, [WINDOW - 1, 10, WINDOW - 1, 10])
    document = ids(40, 1)
    suffixes = [ids(3, 2), ids(11, 3)]  # the second alone moves the window past the document
    flags = ["--model-path", str(model_dir), "--dtype", "float32", "--max-total-tokens", "4096",
             "--attention-backend", backend, "--admin-api-key", KEY, "--am-store-dir", str(tmp_path)]
    with serving(flags) as server:
        registered = ok(server, "POST", "/am/documents", {"input_ids": document, "ratio": ratio,
                                                          "query_source": "context-prefill",
                                                          "compact_windows": compact_windows})
        if backend == "triton":
            status, body = http_json("POST", server + "/am/documents", {"input_ids": ids(40, 9), "ratio": 0.1,
                                                                        "compact_windows": True}, KEY)
            assert status == 400 and "torch_native only" in body["error"], body
        ok(server, "POST", f"/am/documents/{registered['doc_id']}/save")
        sampling = {"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True}
        outputs = ok(server, "POST", "/generate", {
            "input_ids": [document + suffix for suffix in suffixes], "sampling_params": sampling,
            "return_logprob": True, "top_logprobs_num": 5, "logprob_start_len": len(document),
        })
        plain = ok(server, "POST", "/generate", {"input_ids": ids(20, 4), "sampling_params": sampling,
                                                 "return_logprob": True, "top_logprobs_num": 5})
        stats = ok(server, "GET", "/am/stats")
        ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")
    (stored,) = tmp_path.glob(f"*/{registered['doc_id']}.safetensors")
    prefix = CompactedPrefix.load(stored)
    assert prefix.layer_slots == layer_slots
    assert bool(prefix.beta[0].ne(0).any()) == compact_windows  # a compacted window has its own beta

    # One node width for every layer (the widest), reported per layer type.
    slot_bytes = 2 * 2 * 16 * 4  # keys and values, 2 KV heads of 16, float32
    width = registered["slots"]
    assert width == max(layer_slots)
    assert registered["kv_bytes"] == {"global": 2 * width * slot_bytes, "sliding": 2 * width * slot_bytes,
                                      "total": 4 * width * slot_bytes, "uncompacted": 4 * 40 * slot_bytes}
    assert stats["kv_bytes"] == registered["kv_bytes"]

    for suffix, output in zip(suffixes, outputs):
        meta = output["meta_info"]
        assert meta["am_document"][0]["doc_id"] == registered["doc_id"]
        logits, _ = forward_after_prefix(model, prefix, torch.tensor([suffix + output["output_ids"]]))
        reference = torch.log_softmax(logits[0].double(), dim=-1)
        # Prompt log-probs: the client's tokens from logprob_start_len on (the first has no log-prob).
        prompt = meta["input_token_logprobs"]
        assert [token for _, token, _ in prompt] == suffix
        for position, (value, token, _) in enumerate(prompt[1:]):
            assert abs(value - reference[position, token].item()) < 2e-3, (position, value)
        assert_decode_matches(meta, reference[len(suffix) - 1 :])
    # A plain prompt longer than the window: SGLang's own path, decode windows included.
    with torch.no_grad():
        logits = model(torch.tensor([ids(20, 4) + plain["output_ids"]])).logits
    assert_decode_matches(plain["meta_info"], torch.log_softmax(logits[0, 19:].double(), dim=-1))


def assert_decode_matches(meta, reference):
    """Each generated step's top-5 log-probs against the reference rows (row i predicts token i)."""
    for step, served in enumerate(meta["output_top_logprobs"]):
        assert served[0][1] == int(reference[step].argmax()), step
        assert max(abs(value - reference[step, token].item()) for value, token, _ in served) < 2e-3, step
