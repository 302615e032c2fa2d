"""Compacted documents on an in-process ``sglang.Engine``: register, ask, list, drop.

Run with the plugin enabled (and, on a machine without CUDA, SGLang's CPU engine and the
``sgl_kernel`` stand-in; ``sglang_am.server.cpu.cpu_environment`` gives that environment):

    SGLANG_AM=1 python examples/engine_documents.py [--model-path M]

Prints one JSON line with what happened. The default model is the embedded recall model.
"""

from __future__ import annotations

import argparse
import json

import sglang
from transformers import AutoTokenizer

from sglang_am.recall_model import default_model_path, recall_task
from sglang_am.server.cpu import DEFAULT_CPU_MAX_TOTAL_TOKENS, has_cuda
from sglang_am.server.entrypoints.engine import EngineDocuments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=str(default_model_path()))
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args()

    # The am radix cache refuses overlap scheduling, which it does not support.
    settings = {"model_path": args.model_path, "radix_cache_backend": "am", "disable_overlap_schedule": True,
                "dtype": "float32", "log_level": "error"}
    if not has_cuda():
        settings.update(device="cpu", attention_backend="torch_native", max_total_tokens=DEFAULT_CPU_MAX_TOTAL_TOKENS)
    engine = sglang.Engine(**settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
        (document,) = recall_task(num_pairs=300, num_questions=4, seed=3)
        documents = EngineDocuments(engine)
        registered = documents.register(input_ids=tokenizer.encode(document.text), ratio=args.ratio)
        prompts = [tokenizer.encode(f"{document.text}\n{q.question}") for q in document.questions]
        outputs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0})
        listed = documents.list()
        dropped = documents.drop(registered["doc_id"])
        print(json.dumps({
            "registered": registered,
            "answers": [out["text"].strip() for out in outputs],
            "expected": [q.answer for q in document.questions],
            "served_compacted": all("am_document" in out["meta_info"] for out in outputs),
            "listed": [d["doc_id"] for d in listed],
            "dropped": dropped,
            "documents_after_drop": documents.list(),
        }))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
