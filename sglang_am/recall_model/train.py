"""Train the embedded recall model: ``python -m sglang_am.recall_model.train [--minutes 3] [--out DIR]``.

The model starts from the explicit recall circuit of ``circuit.py`` (``--init random`` starts from
random weights instead, which does not learn the key-value binding within a CPU half hour). A
sequence is ``<bos>`` + a recall document + questions, each followed by its one-token answer; the
loss is on the answers only. Documents grow on a curriculum (more pairs once the model answers the
current length well) up to the evaluation lengths, so that recall holds at 1-2k tokens. The result is
evaluated by exact-match recall at 500 and 900 pairs (about 1.2k and 2k tokens with the questions)
before and after training, and written with its tokenizer and a ``training.json`` record.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..quality.tasks import WORDS
from . import CHECKPOINT_DIR, KEY_RANGE, build_tokenizer, recall_task
from .circuit import HEAD_DIM, HIDDEN_SIZE, ROPE_THETA, install_recall_circuit

EVAL_PAIRS = (500, 900)
BARE_FRACTION = 0.5


def encode(tokenizer, document, questions, bare_fraction: float = 0.0, rng: random.Random | None = None):
    """Token ids of document + questions with answers, and labels (-100 except at answer tokens).

    A ``bare_fraction`` of the questions keep only their key (``K123 word``): the same lookup with a
    label every 2 tokens instead of every 7 (denser supervision per token).
    """
    ids = tokenizer(document.text)["input_ids"]
    labels = [-100] * len(ids)
    for question in questions:
        prompt = tokenizer(question.question, add_special_tokens=False)["input_ids"]
        if bare_fraction and rng.random() < bare_fraction:
            prompt = prompt[-1:]
        answer = tokenizer.convert_tokens_to_ids(question.answer)
        ids += [*prompt, answer]
        labels += [-100] * len(prompt) + [answer]
    return ids, labels


def batch(tokenizer, rng: random.Random, num_pairs: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = []
    for _ in range(count):
        pairs = rng.randint(max(2, num_pairs // 2), num_pairs)
        (document,) = recall_task(
            num_pairs=pairs, num_questions=min(pairs, 48), num_choices=2, seed=rng.randrange(2**62)
        )
        rows.append(encode(tokenizer, document, document.questions, BARE_FRACTION, rng))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in rows])
    return ids, labels


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = target != -100
    return (predicted[mask] == target[mask]).float().mean().item()


@torch.no_grad()
def evaluate(model, tokenizer, num_pairs: int, documents: int = 8, seed: int = 12345) -> float:
    model.eval()
    rng = random.Random(seed)
    accuracies = []
    for _ in range(documents):
        (document,) = recall_task(num_pairs=num_pairs, num_questions=32, num_choices=2, seed=rng.randrange(2**62))
        ids, labels = encode(tokenizer, document, document.questions)
        logits = model(torch.tensor([ids])).logits
        accuracies.append(answer_accuracy(logits, torch.tensor([labels])))
    model.train()
    return sum(accuracies) / len(accuracies)


def build_model(tokenizer, init: str, seed: int):
    """A 2-layer Qwen3 (hidden 128, 4 query / 2 KV heads of 32, attention biases, untied embeddings),
    starting from the recall circuit (``init="circuit"``) or transformers' random initialisation."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        rope_theta=ROPE_THETA,
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    if init == "circuit":
        keys = tokenizer.convert_tokens_to_ids([f"K{k}" for k in KEY_RANGE])
        install_recall_circuit(model, keys, tokenizer.convert_tokens_to_ids(list(WORDS)), seed=seed)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="checkpoint directory to write")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget")
    parser.add_argument("--init", choices=("circuit", "random"), default="circuit",
                        help="start from the recall circuit (circuit.py) or from random weights")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per training batch")
    parser.add_argument("--start-pairs", type=int, default=8, help="largest document at the start (pairs)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.init, args.seed).train()
    initial_accuracy = {str(pairs): evaluate(model, tokenizer, pairs) for pairs in EVAL_PAIRS}
    print("exact-match recall before training:", initial_accuracy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = 100
    budget = args.minutes * 60
    final_pairs = max(EVAL_PAIRS)
    num_pairs, recent, log = args.start_pairs, [], []
    start = time.perf_counter()
    progress = tqdm(total=round(budget), unit="s", desc="training")
    step = 0
    while (elapsed := time.perf_counter() - start) < budget:
        # Cosine decay over the wall-clock budget; the curriculum moves on once answers are reliable.
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens_per_row = 2 * num_pairs + 5 * min(num_pairs, 48) + 1
        ids, labels = batch(tokenizer, rng, num_pairs, max(1, args.batch_tokens // tokens_per_row))
        output = model(input_ids=ids, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        accuracy = answer_accuracy(output.logits.detach(), labels)
        if step % 10 == 0:
            log.append({"step": step, "seconds": round(elapsed, 1), "pairs": num_pairs, "loss": output.loss.item(),
                        "accuracy": accuracy})
            progress.set_postfix(pairs=num_pairs, loss=f"{output.loss.item():.3f}", acc=f"{accuracy:.3f}")
        recent = (recent + [accuracy])[-20:]
        if len(recent) == 20 and sum(recent) / 20 > 0.97 and num_pairs < final_pairs:
            num_pairs, recent = min(final_pairs, math.ceil(num_pairs * 1.5)), []
        progress.update(round(time.perf_counter() - start) - progress.n)
    progress.close()

    accuracy = {str(pairs): evaluate(model, tokenizer, pairs) for pairs in EVAL_PAIRS}
    print("exact-match recall after training:", accuracy)
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_curriculum_pairs": num_pairs,
        "eval_recall_accuracy_before_training": initial_accuracy,
        "eval_recall_accuracy": accuracy,
        "eval_tokens": {str(pairs): 1 + 2 * pairs + 7 * 32 for pairs in EVAL_PAIRS},
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "key_range": [KEY_RANGE.start, KEY_RANGE.stop],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "torch": torch.__version__,
        "log": log,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
