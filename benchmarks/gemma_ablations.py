"""Where Gemma-3-270M's answers go when its documents are compacted: three ablations with the
transformers adapter, on the real-text documents served_quality.py asks (seed 0), multiple choice by
likelihood, AM-HighestAttnKeys with context-prefill queries.

- ``fits``: the selected keys with their fitted beta and values, with beta only, and with neither
  (their own values, beta 0), at --fit-ratios: does the loss come from selection or from the fit?
- ``windows``: the sliding-window layers compacted (``compact_windows``) with the global layers left
  whole (the full prefix's global layers spliced in), and both compacted, at --window-ratios.
- ``head budgets``: uniform budgets against --head-budgets (a head-sensitivity file) at
  --budget-ratios; the node is as wide as the widest layer, which the JSON records.

    python benchmarks/gemma_ablations.py             # about 20 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from tqdm.auto import tqdm

from sglang_am import load_head_proportions
from sglang_am.hf import compact_prefix
from sglang_am.hf.compaction import _sliding_layers
from sglang_am.hf.gemma import gemma3_270m_directory, load_gemma3_270m
from sglang_am.hf.metrics import full_prefix, multiple_choice_accuracy
from sglang_am.quality.real_text import choice_text, question_prompt, real_text_qa

FITS = {"fitted": {}, "beta only": {"fit_values": False}, "no fit": {"fit_beta": False, "fit_values": False}}


def configurations(model, args, proportions) -> dict[str, Callable]:
    """Name -> (document ids, full prefix) -> prefix."""
    sliding = _sliding_layers(model)
    compact = lambda ids, ratio, **options: compact_prefix(  # noqa: E731
        model, ids, ratio, query_source="context-prefill", progress=False, **options)

    def windows_only(ids, full, ratio):
        compacted = compact(ids, ratio, compact_windows=True)
        pick = lambda mine, theirs: [a if s else b for a, b, s in zip(mine, theirs, sliding)]  # noqa: E731
        return dataclasses.replace(full, keys=pick(compacted.keys, full.keys), values=pick(compacted.values, full.values),
                                   beta=pick(compacted.beta, full.beta))

    runs = {"full prefix": lambda ids, full: full}
    for ratio in args.fit_ratios:
        for name, options in FITS.items():
            runs[f"fits: {name} @ {ratio}"] = lambda ids, full, r=ratio, o=options: compact(ids, r, **o)
    for ratio in args.window_ratios:
        runs[f"windows: windows only @ {ratio}"] = lambda ids, full, r=ratio: windows_only(ids, full, r)
        runs[f"windows: global + windows @ {ratio}"] = lambda ids, full, r=ratio: compact(ids, r, compact_windows=True)
    for ratio in args.budget_ratios:
        runs[f"head budgets: uniform @ {ratio}"] = lambda ids, full, r=ratio: compact(ids, r)
        runs[f"head budgets: measured @ {ratio}"] = lambda ids, full, r=ratio: compact(ids, r, head_proportions=proportions)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--questions", type=int, default=10, help="questions per document")
    parser.add_argument("--fit-ratios", type=float, nargs="*", default=[0.5, 0.1])
    parser.add_argument("--window-ratios", type=float, nargs="*", default=[0.1, 0.05])
    parser.add_argument("--budget-ratios", type=float, nargs="*", default=[0.1, 0.2])
    parser.add_argument("--head-budgets", type=Path, default=RESULTS_DIR / "head_budgets_gemma3_270m.json")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gemma_ablations.json")
    args = parser.parse_args()

    model, tokenizer = load_gemma3_270m(gemma3_270m_directory())
    proportions = load_head_proportions(json.loads(args.head_budgets.read_text())) if args.budget_ratios else None
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    runs = configurations(model, args, proportions)
    correct = dict.fromkeys(runs, 0)
    slots: dict[str, list[int]] = {name: [] for name in runs}
    asked = 0
    documents = real_text_qa(args.documents, num_questions=args.questions, seed=0)
    with tqdm(total=len(documents) * len(runs), desc="ablations") as bar:
        for document in documents:
            ids = tokenizer.encode(document.text)
            questions = [(encode(question_prompt(q)), [encode(choice_text(c)) for c in q.choices], q.answer_index)
                         for q in document.questions]
            asked += len(questions)
            full = full_prefix(model, ids)
            for name, make in runs.items():
                prefix = make(ids, full)
                correct[name] += round(multiple_choice_accuracy(model, prefix, questions).accuracy * len(questions))
                slots[name].append(prefix.num_slots)
                bar.update(1)
    rows = [{"config": name, "accuracy": correct[name] / asked, "node_slots": slots[name]} for name in runs]
    for row in rows:
        print(f"{row['config']}: {row['accuracy']:.2f} (node {row['node_slots']} slots)")
    payload = {**environment(), "inputs": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                           "questions_asked": asked}, "rows": rows}
    finish(payload, args.output)


if __name__ == "__main__":
    main()
