"""Why compacted Gemma-3-270M documents lose answers: the attention error of its compacted global layers
at the questions' own queries.

For one real-text document, the queries of every question's tokens are recorded from a full forward of
document + question. Each method compacts the document at --ratio with the transformers adapter, and
per global layer the attention of those queries over the document is compared: relative L2 error of
the output and absolute error of the log-sum-exp (the attention mass), full keys against compacted
keys with beta. Writes JSON.

    python benchmarks/gemma_layer_errors.py          # about 4 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, finish

from sglang_am.hf import compact_prefix
from sglang_am.hf.attention import recording_queries
from sglang_am.hf.gemma import gemma3_270m_directory, load_gemma3_270m
from sglang_am.prompts import repeat_ids
from sglang_am.quality import question_prompt, real_text_qa

METHODS = {"AM-HighestAttnKeys": "repeat-prefill", "H2O+": "context-prefill"}


def attend(queries, keys, values, scale, beta=None):
    """Attention of ``queries`` [H_q, n, D] over one KV head's ``keys``/``values`` [S, D] (+ beta [S])."""
    logits = queries @ keys.T * scale
    if beta is not None:
        logits = logits + beta
    return torch.softmax(logits, -1) @ values, torch.logsumexp(logits, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--sentences", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gemma_layer_errors.json")
    args = parser.parse_args()

    model, tokenizer = load_gemma3_270m(gemma3_270m_directory())
    layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    document = real_text_qa(1, num_sentences=args.sentences, num_questions=10, seed=args.seed)[0]
    ids = tokenizer.encode(document.text)
    queries = {layer: [] for layer in layers}
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
        for question in document.questions:
            prompt = tokenizer.encode(question_prompt(question), add_special_tokens=False)
            with recording_queries() as recorded:
                model(torch.tensor([ids + prompt]))
            for layer in layers:
                queries[layer].append(recorded[layer][0][0][:, len(ids):])
    rows = []
    for method, source in METHODS.items():
        prefix = compact_prefix(model, ids, args.ratio, method, query_source=source, repeat_ids=repeat_ids(tokenizer),
                                progress=False)
        for layer in layers:
            scale = model.model.layers[layer].self_attn.scaling
            q = torch.cat(queries[layer], 1).float()
            full, full_lse = attend(q, cache.layers[layer].keys[0, 0].float(), cache.layers[layer].values[0, 0].float(), scale)
            ours, our_lse = attend(q, prefix.keys[layer][0].float(), prefix.values[layer][0].float(), scale,
                                   prefix.beta[layer][0].float())
            rows.append({"method": method, "query_source": source, "layer": layer,
                         "relative_l2": round(((ours - full).norm(dim=-1) / full.norm(dim=-1)).mean().item(), 4),
                         "lse_error": round((our_lse - full_lse).abs().mean().item(), 4)})
            print(rows[-1], flush=True)
    payload = {**environment(), "inputs": {**vars(args), "output": str(args.output), "document_tokens": len(ids),
                                           "question_tokens": sum(q.shape[1] for q in queries[layers[0]])}, "rows": rows}
    finish(payload, args.output)


if __name__ == "__main__":
    torch.set_num_threads(1)  # leaves the other core to whatever else runs; the whole run is a few minutes
    main()
