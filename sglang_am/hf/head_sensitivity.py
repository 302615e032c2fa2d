"""Per-head sensitivity curves and nonuniform head budgets for a model (paper §3.4, method.md §10).

Every KV head of the global layers is compacted alone at each sweep ratio while the others stay at the
baseline ratio; its curve is the rise in log-perplexity of the full-context model's own greedy answers
(the reconstruction loss). The greedy swap of ``optimize_head_proportions`` turns the curves into the
official ``{"L{layer}H{kv_head}": proportion}`` file.

Heads are solved independently from the same reference queries, so one compaction per sweep ratio
serves every head: head h's slots are taken from the ratio-r prefix and spliced into the baseline.

``python -m sglang_am.hf.head_sensitivity --out proportions.json`` runs it on the embedded recall model;
``--model-path`` and ``--task needle`` (or ``real-text``) run it on any causal LM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..core.head_budgets import optimize_head_proportions, save_head_proportions
from ..core.plan import pad_layers
from ..prefix import CompactedPrefix
from .compaction import _sliding_layers, compact_prefix, greedy_generate
from .metrics import full_prefix, reconstruction_log_perplexity

DEFAULT_SWEEP = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


@dataclasses.dataclass(frozen=True)
class SensitivityDocument:
    """A document prompt, its verbatim head length, and question prompts asked after it."""

    input_ids: list[int]
    keep_first: int
    prompts: list[list[int]]


@dataclasses.dataclass(frozen=True)
class SensitivityCurves:
    heads: list[tuple[int, int]]  # (layer, kv_head) of every global-layer KV head
    sweep_ratios: list[float]
    losses: torch.Tensor  # [heads, sweep points]: mean Δ log-perplexity vs the full context

    def proportions(self) -> dict[tuple[int, int], float]:
        p = optimize_head_proportions(self.losses, self.sweep_ratios)
        return {head: float(value) for head, value in zip(self.heads, p)}


def _with_head(
    model: PreTrainedModel, base: CompactedPrefix, other: CompactedPrefix, layer: int, head: int
) -> CompactedPrefix:
    """``base`` with KV head ``head`` of ``layer`` replaced by that head of ``other``."""
    width = max(base.keys[layer].shape[1], other.keys[layer].shape[1])

    def spliced(tensors: list[torch.Tensor], source: torch.Tensor, fill: float) -> list[torch.Tensor]:
        pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1]), value=fill)
        out = list(tensors)
        out[layer] = pad(tensors[layer]).clone()
        out[layer][head] = pad(source)[head]
        return out

    keys, values, beta = pad_layers(
        spliced(base.keys, other.keys[layer], 0.0),
        spliced(base.values, other.values[layer], 0.0),
        spliced(base.beta, other.beta[layer], float("-inf")),
        fixed=_sliding_layers(model),
    )
    return dataclasses.replace(base, keys=keys, values=values, beta=beta)


def _without_span(model: PreTrainedModel, prefix: CompactedPrefix, keep_first: int) -> CompactedPrefix:
    """Every global head's compacted span masked (beta = -inf), kept head tokens and windows untouched: ratio 0."""
    beta = [b.clone() for b in prefix.beta]
    for b, window in zip(beta, _sliding_layers(model)):
        if not window:
            b[:, keep_first:] = float("-inf")
    return dataclasses.replace(prefix, beta=beta)


def head_sensitivity_curves(
    model: PreTrainedModel,
    documents: Sequence[SensitivityDocument],
    sweep_ratios: Sequence[float] = DEFAULT_SWEEP,
    baseline_ratio: float = 0.05,
    method: str = "AM-HighestAttnKeys",
    max_new_tokens: int = 8,
    eos_token_id: int | None = None,
    progress: bool = True,
    **compact_options: object,
) -> SensitivityCurves:
    """Sensitivity curves of every global-layer KV head, averaged over ``documents``.

    ``compact_options`` go to ``compact_prefix`` (query source, method options...). The reference answers
    are the full-context model's greedy answers (up to ``max_new_tokens``) to each prompt.
    """
    sweep = [float(r) for r in sweep_ratios]
    if len(sweep) < 2 or sweep != sorted(set(sweep)) or sweep[0] < 0 or sweep[-1] > 1:
        raise ValueError(f"sweep_ratios must be increasing values in [0, 1], at least two; got {list(sweep_ratios)}")
    if not 0 < baseline_ratio <= 1:
        raise ValueError(f"baseline_ratio must be in (0, 1], got {baseline_ratio}")
    if not documents or any(not d.prompts for d in documents):
        raise ValueError("documents must be non-empty, each with at least one prompt")
    global_layers = [i for i, window in enumerate(_sliding_layers(model)) if not window]
    heads = [(layer, h) for layer in global_layers for h in range(model.config.num_key_value_heads)]
    losses = torch.zeros(len(heads), len(sweep), dtype=torch.float64)
    bar = tqdm(total=len(documents) * len(sweep) * (1 + len(heads)), desc="head sensitivity", disable=not progress)
    for document in documents:
        reference = full_prefix(model, document.input_ids)
        # One prompt at a time: a sliding-window model cannot batch prompts of different lengths.
        answers = [greedy_generate(model, reference, [prompt], max_new_tokens, eos_token_id)[0]
                   for prompt in document.prompts]
        samples = list(zip(document.prompts, answers))
        full_loss = reconstruction_log_perplexity(model, reference, samples)
        compact = lambda ratio, document=document: compact_prefix(
            model, document.input_ids, ratio, method, keep_first=document.keep_first, progress=False, **compact_options
        )
        baseline = compact(baseline_ratio)
        for column, ratio in enumerate(sweep):
            if ratio == 0:
                swept = _without_span(model, baseline, document.keep_first)
            else:  # compaction is seeded, so the baseline ratio's prefix is the baseline itself
                swept = baseline if ratio == baseline_ratio else compact(ratio)
            bar.update(1)
            for row, (layer, head) in enumerate(heads):
                mixed = _with_head(model, baseline, swept, layer, head)
                losses[row, column] += reconstruction_log_perplexity(model, mixed, samples) - full_loss
                bar.update(1)
    bar.close()
    return SensitivityCurves(heads=heads, sweep_ratios=sweep, losses=losses / len(documents))


def _documents(task: str, tokenizer, count: int, seed: int) -> list[SensitivityDocument]:
    from ..prompts import document_prompt, instruction_ids
    from ..quality import needle_in_document

    if task == "real-text":  # as the batch-QA workload asks them: the document's ids, then the question
        from ..quality.real_text import question_prompt, real_text_qa

        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        return [SensitivityDocument(tokenizer.encode(doc.text), 0, [encode(question_prompt(q)) for q in doc.questions])
                for doc in real_text_qa(count, num_questions=8, seed=seed)]
    if task == "recall":
        from ..recall_model import recall_task

        docs = recall_task(num_documents=count, num_pairs=300, num_questions=8, seed=seed)
    else:
        docs = needle_in_document(num_documents=count, num_sentences=60, num_questions=6, seed=seed)
    out = []
    for doc in docs:
        prompt = document_prompt(tokenizer, doc.text)
        questions = [instruction_ids(tokenizer, " " + q.question) for q in doc.questions]
        out.append(SensitivityDocument(prompt.input_ids, prompt.keep_first, questions))
    return out


def _plot(curves: SensitivityCurves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (layer, head), row in zip(curves.heads, curves.losses):
        ax.plot(curves.sweep_ratios, row.tolist(), marker=".", label=f"L{layer}H{head}")
    ax.set_xlabel("ratio of this head (others at baseline)")
    ax.set_ylabel("Δ log-perplexity vs full context")
    if len(curves.heads) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure per-head sensitivity curves and write head budgets.")
    parser.add_argument("--model-path", help="HF model directory (default: the embedded recall model)")
    parser.add_argument("--task", choices=("recall", "needle", "real-text"), help="documents to measure on "
                        "(default: recall for the embedded model, needle otherwise)")
    parser.add_argument("--documents", type=int, default=2, help="documents to average over")
    parser.add_argument("--method", default="AM-HighestAttnKeys")
    parser.add_argument("--query-source", default="context-prefill")
    parser.add_argument("--baseline-ratio", type=float, default=0.05)
    parser.add_argument("--sweep", default=",".join(map(str, DEFAULT_SWEEP)), help="comma-separated ratios")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="length of the reference answers")
    parser.add_argument("--seed", type=int, default=1000, help="document seed (keep it apart from evaluation seeds)")
    parser.add_argument("--out", type=Path, required=True, help="proportions JSON to write; "
                        "curves go to <out>.curves.json and <out>.curves.png")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..recall_model import default_model_path

    path = args.model_path or default_model_path()
    task = args.task or ("recall" if args.model_path is None else "needle")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    curves = head_sensitivity_curves(
        model, _documents(task, tokenizer, args.documents, args.seed),
        sweep_ratios=[float(r) for r in args.sweep.split(",")], baseline_ratio=args.baseline_ratio,
        method=args.method, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        query_source=args.query_source,
    )
    save_head_proportions(args.out, curves.proportions())
    record = {"model": str(path), "task": task, "arguments": {k: str(v) for k, v in vars(args).items()},
              "heads": [f"L{l}H{h}" for l, h in curves.heads], "sweep_ratios": curves.sweep_ratios,
              "losses": curves.losses.tolist()}
    Path(f"{args.out}.curves.json").write_text(json.dumps(record, indent=1))
    _plot(curves, Path(f"{args.out}.curves.png"))
    print(f"wrote {args.out} ({len(curves.heads)} heads) and its curves")


if __name__ == "__main__":
    main()
