"""Which reference queries keep Gemma-3-270M's answers, and why query-agnostic ones lose them (the
transformers adapter, real-text QA, multiple choice by likelihood, AM-HighestAttnKeys on the three
global layers, windows verbatim).

Per document: one prefill gives the document's keys/values and its repeat-prefill queries; each question's
prompt is teacher-forced after the document for its own queries (the ``questions`` source). Then:

- ``mixtures``: questions alone, questions weighted 0.9 / 0.75 / 0.5 against repeat-prefill (their rows
  repeated to their share, as ``core.plan.fill_queries`` does), and repeat-prefill alone, at --ratios;
- ``transfer``: fitted to half of the questions, scored on the other half (questions not given);
- ``why``: per global layer, at the questions' answer positions (the queries that predict the answer), the
  relative attention-output error and the share of the document keys holding half of the full attention
  mass there that the selection kept; and a swap of the two halves of the method: keys selected by one
  source with beta and values fitted to the other;
- ``agnostic``: query-agnostic attempts to close the gap: every repeat-prefill query (no cap), context-prefill
  added, and a document-built question probe per sentence.

Writes JSON and a plot.

    python benchmarks/question_queries.py            # about 40 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from sglang_am.core import compact, register_method
from sglang_am.core.methods import Selection
from sglang_am.core.methods.highest_attn_keys import HighestAttnKeysOptions
from sglang_am.core.plan import fill_queries, pool_queries, subsample_queries
from sglang_am.hf import compact_prefix
from sglang_am.hf.compaction import _continuation_queries, _prefill
from sglang_am.hf.gemma import gemma3_270m_directory, load_gemma3_270m
from sglang_am.hf.metrics import full_prefix, multiple_choice_accuracy
from sglang_am.prompts import repeat_ids
from sglang_am.quality.real_text import choice_text, question_prompt, real_text_qa

CAP = 5000  # pooled queries per KV head, the server's default
SHARES = [1.0, 0.9, 0.75, 0.5, 0.0]  # the questions' weight against repeat-prefill (0: repeat-prefill alone)
_FIXED: dict[str, torch.Tensor] = {}


@register_method("benchmark:given-keys", HighestAttnKeysOptions, query_source="none",
                 description="this benchmark's keys selected elsewhere, then AM-HighestAttnKeys' beta and value fits")
def _given_keys(block, budgets, options) -> Selection:
    return Selection(_FIXED["indices"])


class Document:
    """One document's prefill, queries and questions, and the compactions built from them."""

    def __init__(self, model, tokenizer, document, seed: int):
        self.model, self.layers = model, [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self.ids = tokenizer.encode(document.text)
        between = repeat_ids(tokenizer)
        length = len(self.ids)
        kv, recorded = _prefill(model, self.ids, between)
        self.kv = {layer: kv[layer] for layer in self.layers}
        self.repeat = {layer: recorded[layer][0][0][:, length + len(between) :] for layer in self.layers}
        self.context = {layer: recorded[layer][0][0][:, :length] for layer in self.layers}
        self.prompts = [encode(question_prompt(q)) for q in document.questions]
        self.per_question = [_continuation_queries(model, kv, length, [p]) for p in self.prompts]
        self.items = [(p, [encode(choice_text(c)) for c in q.choices], q.answer_index)
                      for p, q in zip(self.prompts, document.questions)]
        sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", document.text) if len(s.split()) > 2]
        probes = [encode(f"\n\nQuestion: What does the text say?\nAnswer: {' '.join(s.split()[:-1])}") for s in sentences]
        self.probes = _continuation_queries(model, kv, length, probes)
        self.full = full_prefix(model, self.ids)
        self.base = compact_prefix(model, self.ids, 0.1, query_source="repeat-prefill", repeat_ids=between, progress=False)
        self.heads = model.config.num_key_value_heads
        self.seed = seed

    def questions(self, subset) -> dict[int, torch.Tensor]:
        return {layer: torch.cat([self.per_question[i][layer] for i in subset], 1) for layer in self.layers}

    def answers(self, subset) -> dict[int, torch.Tensor]:
        return {layer: torch.cat([self.per_question[i][layer][:, -1:] for i in subset], 1) for layer in self.layers}

    def mix(self, parts, layer: int, generator) -> torch.Tensor:
        """``parts``: (queries by layer, share of the cap or None for all up to the cap, fill to the share?)."""
        pooled = []
        for queries, share, fill in parts:
            rows = pool_queries(queries[layer], self.heads)
            cap = CAP if share is None else max(1, round(share * CAP))
            pooled.append(fill_queries(rows, cap, generator) if fill else subsample_queries(rows, cap, generator))
        return torch.cat(pooled, dim=1)

    def build(self, ratio: float, select_parts, fit_parts=None):
        """A prefix whose global layers select keys with ``select_parts`` and fit beta and values with
        ``fit_parts`` (the same by default); its per-layer selections."""
        generator = torch.Generator().manual_seed(self.seed)
        prefix = dataclasses.replace(self.base, keys=list(self.base.keys), values=list(self.base.values),
                                     beta=list(self.base.beta))
        selected = {}
        for layer in self.layers:
            keys, values = self.kv[layer]
            budget = max(1, round(ratio * len(self.ids)))
            scale = self.model.model.layers[layer].self_attn.scaling
            result = compact(keys, values, self.mix(select_parts, layer, generator), budget, scale=scale)
            if fit_parts is not None:
                _FIXED["indices"] = result.indices
                result = compact(keys, values, self.mix(fit_parts, layer, generator), budget, "benchmark:given-keys",
                                 scale=scale)
            prefix.keys[layer], prefix.values[layer], prefix.beta[layer] = result.keys, result.values, result.beta.float()
            selected[layer] = result.indices
        return prefix, selected

    def score(self, prefix, subset) -> list[bool]:
        picks = multiple_choice_accuracy(self.model, prefix, [self.items[i] for i in subset]).predictions
        return [pick == self.items[i][2] for pick, i in zip(picks, subset)]

    def why(self, prefix, selected, subset) -> dict:
        """Per layer at the answer positions: relative output error, and the kept share of the top-half-mass keys."""
        answers = self.answers(subset)
        figures = {}
        for layer in self.layers:
            keys, values = (t[0].float() for t in self.kv[layer])
            scale = self.model.model.layers[layer].self_attn.scaling
            queries = answers[layer].float()  # [H_q, n, D] (one KV head)
            weights = torch.softmax(queries @ keys.T * scale, -1)
            full = weights @ values
            logits = queries @ prefix.keys[layer][0].float().T * scale + prefix.beta[layer][0].float()
            ours = torch.softmax(logits, -1) @ prefix.values[layer][0].float()
            error = ((ours - full).norm(dim=-1) / full.norm(dim=-1)).mean()
            kept = torch.zeros(keys.shape[0], dtype=torch.bool)
            kept[selected[layer][0][selected[layer][0] >= 0]] = True
            ordered, order = weights.sort(dim=-1, descending=True)
            top = (ordered.cumsum(-1) - ordered) < 0.5  # the keys that hold the first half of the mass
            coverage = (kept[order] & top).sum(-1).float() / top.sum(-1).float()
            figures[str(layer)] = {"answer_error": round(float(error), 4), "top_keys_kept": round(float(coverage.mean()), 4),
                                   "top_keys": round(float(top.sum(-1).float().mean()), 1)}
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--questions", type=int, default=20, help="questions per document (even: half is held out)")
    parser.add_argument("--sentences", type=int, default=140)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--seed", type=int, default=13, help="a seed the serving benchmarks do not use")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "question_queries.json")
    args = parser.parse_args()

    model, tokenizer = load_gemma3_270m(gemma3_270m_directory())
    documents = real_text_qa(args.documents, num_sentences=args.sentences, num_questions=args.questions, seed=args.seed)
    everything, given, held = range(args.questions), range(0, args.questions, 2), range(1, args.questions, 2)
    results: dict[str, list[bool]] = {}
    why: dict[str, list[dict]] = {}

    def record(name: str, outcome: list[bool]) -> None:
        results.setdefault(name, []).extend(outcome)

    for index, document in enumerate(tqdm(documents, desc="documents")):
        doc = Document(model, tokenizer, document, args.seed)
        record("full context", doc.score(doc.full, everything))
        record("full context, held-out half", doc.score(doc.full, held))
        asked, first_half = doc.questions(everything), doc.questions(given)
        for ratio in args.ratios:
            for share in SHARES:
                parts = [(doc.repeat, None, False)] if share == 0 else [(asked, share, True)] + (
                    [(doc.repeat, 1 - share, False)] if share < 1 else [])
                name = "repeat-prefill" if share == 0 else f"questions {share:g}" + (" + repeat-prefill" if share < 1 else "")
                prefix, selected = doc.build(ratio, parts)
                record(f"{name} @ {ratio}", doc.score(prefix, everything))
                why.setdefault(f"{name} @ {ratio}", []).append(doc.why(prefix, selected, everything))
                if share in (1.0, 0.75, 0.0):  # fitted to half of the questions, scored on the others
                    half = [(doc.repeat, None, False)] if share == 0 else [(first_half, share, True)] + (
                        [(doc.repeat, 1 - share, False)] if share < 1 else [])
                    record(f"transfer: {name} @ {ratio}", doc.score(doc.build(ratio, half)[0], held))
        for ratio in (0.1, 0.5):
            repeat, questions = [(doc.repeat, None, False)], [(asked, 1.0, True)]
            for name, select, fit in (("keys by repeat-prefill, fit to the questions", repeat, questions),
                                      ("keys by the questions, fit to repeat-prefill", questions, repeat)):
                prefix, selected = doc.build(ratio, select, fit)
                record(f"{name} @ {ratio}", doc.score(prefix, everything))
                why.setdefault(f"{name} @ {ratio}", []).append(doc.why(prefix, selected, everything))
            if ratio == 0.5:
                prefix, selected = doc.build(ratio, repeat)
                record("repeat-prefill @ 0.5", doc.score(prefix, everything))
                why.setdefault("repeat-prefill @ 0.5", []).append(doc.why(prefix, selected, everything))
        for name, parts in (("repeat-prefill, every query (no cap)", [(doc.repeat, 4.0, False)]),
                            ("context-prefill + repeat-prefill", [(doc.context, 0.5, False), (doc.repeat, 0.5, False)]),
                            ("document-built question probes", [(doc.probes, 1.0, True)])):
            prefix, selected = doc.build(0.1, parts)
            record(f"{name} @ 0.1", doc.score(prefix, everything))
            why.setdefault(f"{name} @ 0.1", []).append(doc.why(prefix, selected, everything))
        print(f"document {index}: " + ", ".join(f"{k}: {sum(v)}/{len(v)}" for k, v in results.items()), flush=True)

    rows = [{"config": name, "correct": sum(outcome), "questions": len(outcome),
             "accuracy": round(sum(outcome) / len(outcome), 4), **({"layers": _mean_layers(why[name])} if name in why else {})}
            for name, outcome in results.items()]
    payload = {**environment(), "inputs": {**vars(args), "output": str(args.output), "cap": CAP, "shares": SHARES},
               "rows": rows}
    for row in rows:
        print(f"{row['config']:<55} {row['correct']:>3}/{row['questions']:<3}"
              + ("  " + "  ".join(f"L{k}: err {v['answer_error']:.3f} kept {v['top_keys_kept']:.2f}"
                                  for k, v in row["layers"].items()) if "layers" in row else ""))
    finish(payload, args.output, plot)


def _mean_layers(figures: list[dict]) -> dict:
    return {layer: {name: round(sum(f[layer][name] for f in figures) / len(figures), 4) for name in figures[0][layer]}
            for layer in figures[0]}


def plot(payload: dict) -> Figure:
    rows = {row["config"]: row for row in payload["rows"]}
    ratios = payload["inputs"]["ratios"]
    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 2)
    full = rows["full context"]["accuracy"]
    for ratio, marker in zip(ratios, "os^"):
        names = [name for name in rows if name.endswith(f" @ {ratio}") and not name.startswith(("transfer", "keys"))
                 and ("questions" in name or name.startswith("repeat-prefill @"))]
        axes[0].plot(range(len(names)), [rows[n]["accuracy"] for n in names], marker=marker, label=f"ratio {ratio}")
        axes[0].set_xticks(range(len(names)), [n.rsplit(" @ ", 1)[0] for n in names], rotation=30, ha="right", fontsize=7)
    axes[0].axhline(full, color="black", linestyle="--", label="full context")
    axes[0].set_ylabel("accuracy (given questions)")
    axes[0].set_title("reference queries: the questions' weight against repeat-prefill")
    axes[0].legend(fontsize=7)
    layers = [name for name in rows if "layers" in rows[name] and name.endswith("@ 0.1")]
    for name in layers:
        figures = rows[name]["layers"]
        axes[1].plot([float(v["top_keys_kept"]) for v in figures.values()], [float(v["answer_error"]) for v in figures.values()],
                     marker="o", linestyle="none", label=name.rsplit(" @ ", 1)[0], alpha=0.8)
    axes[1].set_xlabel("share of the answer's top-half-mass keys kept (per global layer)")
    axes[1].set_ylabel("attention-output error at the answer positions")
    axes[1].set_title("why (ratio 0.1; one point per global layer)")
    axes[1].legend(fontsize=6)
    fig.suptitle(f"Gemma-3-270M, real-text QA, {payload['inputs']['documents']} documents × "
                 f"{payload['inputs']['questions']} questions, AM-HighestAttnKeys")
    return fig


if __name__ == "__main__":
    main()
