"""From a document and a transformers model to a ``CompactedPrefix``, and forward passes after it.

Reference queries come from the model's own prefill (recorded by the registered attention function),
are pooled per KV head (each KV head gets the queries of every query head in its group) and capped by
uniform subsampling. Each layer's document keys and values come from the same prefill's cache.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel
from transformers.models.llama.modeling_llama import rotate_half  # the half-split layout Llama/Qwen/Mistral share

from ..core import get_method
from ..core.plan import LayerPlan, assemble_layer, check_budget, pad_layers, source_fractions
from ..fingerprint import model_fingerprint
from ..prefix import CompactedPrefix
from .attention import prefix_bias, recording_queries, use_sglang_am_attention


def _layer_types(model: PreTrainedModel) -> list[str]:
    types = getattr(model.config, "layer_types", None)
    return list(types) if types else ["full_attention"] * model.config.num_hidden_layers


def _sliding_layers(model: PreTrainedModel) -> list[bool]:
    """Per layer: is it a sliding-window layer (kept uncompacted, served by transformers' own mask)?"""
    return [kind == "sliding_attention" for kind in _layer_types(model)]


def _random_queries(model: PreTrainedModel, layer: int, count: int, generator: torch.Generator) -> torch.Tensor:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    queries = torch.randn(config.num_key_value_heads, count, head_dim, generator=generator)
    attention = model.model.layers[layer].self_attn
    q_norm = getattr(attention, "q_norm", None)  # Qwen3/Gemma-3 normalise q: follow its per-dim scale
    if q_norm is not None:
        queries = queries * q_norm.weight.detach().float().cpu()
    return queries


def right_padded(sequences: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded with 0 ``[B, L]`` and the mask of real tokens (right padding is causal-safe)."""
    longest = max(len(sequence) for sequence in sequences)
    rows = torch.tensor([list(c) + [0] * (longest - len(c)) for c in sequences], device=device)
    real = torch.tensor([[i < len(c) for i in range(longest)] for c in sequences], device=device)
    return rows, real


def _continuation_queries(
    model: PreTrainedModel,
    document_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    length: int,
    continuations: Sequence[Sequence[int]],
) -> dict[int, torch.Tensor]:
    """Teacher-force the continuations after the document's keys/values (``[H_kv, S, D]`` per layer);
    ``{layer: [H_q, tokens, D]}``."""
    device = next(model.parameters()).device
    rows, real = right_padded(continuations, device)
    longest = rows.shape[1]
    batch_cache = DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(document_kv):
        expand = lambda t: t.unsqueeze(0).expand(len(continuations), -1, -1, -1).contiguous()
        batch_cache.update(expand(keys), expand(values), layer)
    positions = torch.arange(length, length + longest, device=device).expand(len(continuations), -1)
    with torch.no_grad(), recording_queries() as recorded:
        model(rows, past_key_values=batch_cache, position_ids=positions, use_cache=True)
    # [B, H_q, L, D] -> [H_q, real tokens, D] (right padding dropped)
    return {layer: q[0].permute(1, 0, 2, 3)[:, real] for layer, q in recorded.items()}


class _OnPolicyContinuations:
    """Self-study continuations advanced one decoder layer at a time over already-compacted layers, so
    layer l's queries see layers < l compacted. Each layer runs twice (capture, then advance on the
    compacted block): O(layers) layer forwards, not O(layers^2)."""

    def __init__(self, model: PreTrainedModel, continuations: Sequence[Sequence[int]], length: int):
        device = next(model.parameters()).device
        rows, self.real = right_padded(continuations, device)
        longest = rows.shape[1]
        self.model = model
        self.positions = torch.arange(length, length + longest, device=device).expand(len(continuations), -1)
        layer_types = _layer_types(model)
        takes_layer_type = "layer_type" in inspect.signature(model.model.rotary_emb.forward).parameters
        with torch.no_grad():
            self.hidden = model.model.embed_tokens(rows)
            self.position_embeddings = [  # Gemma-3 rotates window and global layers differently
                model.model.rotary_emb(self.hidden, self.positions, *([kind] if takes_layer_type else []))
                for kind in layer_types
            ]

    def _run(self, layer: int, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
        batch = self.hidden.shape[0]
        cache = DynamicCache(config=self.model.config)
        cache.update(keys.unsqueeze(0).expand(batch, -1, -1, -1), values.unsqueeze(0).expand(batch, -1, -1, -1), layer)
        betas = [None] * self.model.config.num_hidden_layers
        betas[layer] = beta
        with torch.no_grad(), prefix_bias(betas):
            return self.model.model.layers[layer](
                self.hidden, attention_mask=None, position_ids=self.positions, past_key_values=cache,
                use_cache=True, position_embeddings=self.position_embeddings[layer],
            )

    def queries(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s queries ``[H_q, real tokens, D]`` (they depend only on its input states)."""
        with recording_queries() as recorded:
            self._run(layer, keys, values, None)
        return recorded[layer][0].permute(1, 0, 2, 3)[:, self.real]

    def advance(self, layer: int, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor) -> None:
        """Move the continuations' states through ``layer`` attending to its compacted block (or window)."""
        self.hidden = self._run(layer, keys, values, beta)


@dataclasses.dataclass
class _ChunkSource:
    """Where one chunk's keys, values and queries come from: a prefill, the chunk's positions in it, and
    the RoPE offset its keys need to reach their place in the document (0 for KV-based chunks)."""

    document_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [H_kv, S, D] of the prefilled text
    recorded: dict[int, list[torch.Tensor]]  # per layer, the prefill's queries [1, H_q, L, D]
    text_length: int  # tokens of the prefilled text (continuations start there)
    positions: range  # the chunk's tokens in the prefill
    source_offsets: dict[str, int]  # where each positional query source's copy of the chunk starts
    rope_shift: int
    self_study: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    questions: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


def _reference_queries(model: PreTrainedModel, plan: LayerPlan, source: _ChunkSource, layer: int, chunk: range,
                       on_policy: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """One layer's reference queries for one chunk, from each of the plan's sources, pooled per KV head."""
    queries = {}
    for kind, fraction in plan.query_fractions.items():
        if kind == "random":
            cap = max(1, round(fraction * plan.max_queries_per_head))
            queries[kind] = _random_queries(model, layer, min(cap, len(chunk)), generator)
        elif kind == "self-study":
            queries[kind] = on_policy if on_policy is not None else source.self_study[layer]
        elif kind == "questions":
            queries[kind] = source.questions[layer]
        else:
            positions = torch.tensor(list(chunk), device=source.recorded[layer][0].device) + source.source_offsets[kind]
            queries[kind] = source.recorded[layer][0][0][:, positions]
    return plan.reference_queries(queries, model.config.num_key_value_heads, generator)


def _prefill(
    model: PreTrainedModel, ids: list[int], repeat_ids: Sequence[int] | None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[int, list[torch.Tensor]]]:
    """Keys/values of ``ids`` per layer and the recorded queries of ``ids`` (+ ``repeat_ids`` + ``ids``)."""
    device = next(model.parameters()).device
    sliding = _sliding_layers(model)
    sequence = ids + list(repeat_ids) + ids if repeat_ids is not None else ids
    with torch.no_grad(), recording_queries() as recorded:
        cache = model(torch.tensor([sequence], device=device), use_cache=True).past_key_values
        if any(sliding) and len(sequence) > len(ids):  # window layers kept the second copy's window: redo
            windows = model(torch.tensor([ids], device=device), use_cache=True).past_key_values
        else:
            windows = cache
    # The text's keys/values per layer: all its tokens, or a window layer's last tokens.
    document_kv = [
        (windows.layers[i].keys[0], windows.layers[i].values[0]) if window
        else (cache.layers[i].keys[0, :, : len(ids)], cache.layers[i].values[0, :, : len(ids)])
        for i, window in enumerate(sliding)
    ]
    return document_kv, recorded


def _shift_rope(model: PreTrainedModel, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Post-RoPE keys ``[H, t, D]`` moved ``shift`` positions later (RoPE composes: R(p + s) = R(s) R(p))."""
    if shift == 0:
        return keys
    position = torch.tensor([[shift]], device=keys.device)
    rotary = model.model.rotary_emb
    cos, sin = rotary(keys.unsqueeze(0).float(), position)  # [1, 1, D], the model's own frequencies
    if cos.shape[-1] != keys.shape[-1]:
        raise ValueError("text-based chunking needs RoPE over the whole head dimension")
    scaling = getattr(rotary, "attention_scaling", 1.0)  # already applied once to the keys (YaRN-style RoPE)
    cos, sin = cos[0] / scaling, sin[0] / scaling
    return (keys.float() * cos + rotate_half(keys.float()) * sin).to(keys.dtype)


def compact_prefix(
    model: PreTrainedModel,
    input_ids: Sequence[int] | torch.Tensor,
    budget: int | float,
    method: str = "AM-HighestAttnKeys",
    query_source: str | Mapping[str, float] = "context-prefill",
    repeat_ids: Sequence[int] | None = None,
    self_study_ids: Sequence[Sequence[int]] | None = None,
    question_ids: Sequence[Sequence[int]] | None = None,
    on_policy: bool = False,
    keep_first: int = 0,
    keep_last: int = 0,
    chunk_size: int | None = None,
    chunking: str = "kv",
    head_proportions: dict[tuple[int, int], float] | None = None,
    max_ratio_per_head: float = 1.0,
    max_queries_per_head: int = 5000,
    compact_windows: bool = False,
    seed: int = 0,
    progress: bool = True,
    **options: object,
) -> CompactedPrefix:
    """Compact the KV cache of ``input_ids`` layer by layer.

    budget: slots per KV head for the compacted span (int) or a ratio of its length (float in (0, 1]).
    query_source: ``context-prefill`` (the document's own queries), ``repeat-prefill`` (queries of a
        second copy of the document after ``repeat_ids``, e.g. ``repeat_ids(tokenizer)`` from
        ``sglang_am.prompts``), ``self-study`` (queries of ``self_study_ids``, continuations such as
        those from ``self_study_continuations``, teacher-forced after the document), ``random``
        (Gaussian queries, scaled by the q-norm weight where the model has one), ``questions`` (queries
        of ``question_ids``, the prompts that will follow the document, teacher-forced after it; their
        fraction is their weight, see ``core.plan.QUESTION_SHARE`` and ``with_questions``), a mixture
        name (``ss-plus-repeat``) or a mapping ``{source: fraction of the query cap}``.
    on_policy: re-extract the self-study queries of each layer with the layers below it already
        compacted (paper §8), from cached continuation states: O(layers) layer forwards.
    keep_first, keep_last: tokens kept verbatim (beta = 0) before and after the compacted span, e.g.
        the chat template around a document; each layer's slots are ``[kept | compacted | kept]``.
    chunk_size: compact the span in chunks of this many tokens; each chunk gets its share of the budget.
    chunking: ``"kv"`` (default): keys, values and positional queries are sliced from one full prefill,
        so positions and cross-chunk context are exact. ``"text"``: each chunk is prefilled alone after
        the ``keep_first`` tokens (the last one with the ``keep_last`` tokens), compacted, and its keys
        rotated to their place in the document; cheaper for long documents, cross-chunk context is
        lost. Not for sliding-window models or on-policy runs.
    head_proportions: nonuniform budgets ``{(layer, kv_head): p}`` (see ``load_head_proportions``),
        applied per chunk with ``max_ratio_per_head``.
    compact_windows: compact each sliding-window layer's window (the document's last W - 1 tokens) to the
        span's per-head budget with the same method and reference queries, instead of keeping it verbatim.
        Its slots then stand at the window's last positions: the model's sliding mask drops the earliest
        first as later tokens move on.
    options: fields of the method's options dataclass; PyramidKV gets ``layer``/``num_layers`` here.
    """
    ids = [int(t) for t in (input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
    length = len(ids)
    if min(keep_first, keep_last) < 0 or keep_first + keep_last >= length:
        raise ValueError(f"keep_first ({keep_first}) + keep_last ({keep_last}) must leave tokens of the "
                         f"{length}-token input to compact")
    fractions = source_fractions(query_source)
    if "repeat-prefill" in fractions and not repeat_ids:
        raise ValueError("repeat-prefill needs repeat_ids (the tokens between the two copies)")
    if "self-study" in fractions and (not self_study_ids or any(len(c) == 0 for c in self_study_ids)):
        raise ValueError("self-study needs self_study_ids (non-empty continuation token lists)")
    if "questions" in fractions and (not question_ids or any(len(q) == 0 for q in question_ids)):
        raise ValueError("the questions source needs question_ids (non-empty prompt token lists)")
    if on_policy and "self-study" not in fractions:
        raise ValueError("on_policy re-extracts self-study queries: include self-study in query_source")
    if max_queries_per_head < 1:
        raise ValueError(f"max_queries_per_head must be >= 1, got {max_queries_per_head}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sliding = _sliding_layers(model)
    if chunking not in ("kv", "text"):
        raise ValueError(f"chunking must be 'kv' or 'text', got {chunking!r}")
    if chunking == "text" and (any(sliding) or on_policy):
        raise ValueError("text-based chunking supports neither sliding-window models nor on_policy; use chunking='kv'")
    if head_proportions is not None and not isinstance(budget, float):
        raise ValueError("head_proportions need the budget as a ratio (float)")
    check_budget(budget)
    get_method(method)  # an unknown method fails before the prefill
    use_sglang_am_attention(model)
    span = range(keep_first, length - keep_last)
    step = chunk_size or len(span)
    chunks = [span[i : i + step] for i in range(0, len(span), step)]
    repeat = list(repeat_ids) if "repeat-prefill" in fractions else None

    # One prefill serves keys/values, context queries (first copy) and repeat queries (second copy); text
    # chunking prefills each chunk on its own (after the kept head; the last one with the kept tail).
    timings = dict.fromkeys(("prefill", "self_study", "selection", "beta", "values"), 0.0)
    start = time.perf_counter()
    if chunking == "kv":
        document_kv, recorded = _prefill(model, ids, repeat)
        offsets = {"context-prefill": 0, "repeat-prefill": length + len(repeat or ())}
        sources = [_ChunkSource(document_kv, recorded, length, chunk, offsets, 0) for chunk in chunks]
        head = [(k[:, :keep_first], v[:, :keep_first]) for k, v in document_kv]
        tail = [(k[:, span.stop : length], v[:, span.stop : length]) for k, v in document_kv]
    else:
        sources = []
        for index, chunk in enumerate(chunks):
            piece = ids[:keep_first] + ids[chunk.start : chunk.stop] + (ids[span.stop :] if index == len(chunks) - 1 else [])
            piece_kv, piece_recorded = _prefill(model, piece, repeat)
            offsets = {"context-prefill": 0, "repeat-prefill": len(piece) + len(repeat or ())}
            positions = range(keep_first, keep_first + len(chunk))
            sources.append(_ChunkSource(piece_kv, piece_recorded, len(piece), positions, offsets, chunk.start - keep_first))
        head = [(k[:, :keep_first], v[:, :keep_first]) for k, v in sources[0].document_kv]
        last = sources[-1]
        tail = [(_shift_rope(model, k[:, last.positions.stop :], last.rope_shift), v[:, last.positions.stop :])
                for k, v in last.document_kv]
    timings["prefill"] = time.perf_counter() - start
    start = time.perf_counter()
    if "self-study" in fractions and not on_policy:
        studied = {}  # KV chunks share one prefill: teacher-force the continuations once
        for source in sources:
            if id(source.document_kv) not in studied:
                studied[id(source.document_kv)] = _continuation_queries(
                    model, source.document_kv, source.text_length, self_study_ids
                )
            source.self_study = studied[id(source.document_kv)]
    if "questions" in fractions:
        asked = {}
        for source in sources:
            if id(source.document_kv) not in asked:
                asked[id(source.document_kv)] = _continuation_queries(model, source.document_kv, source.text_length, question_ids)
            source.questions = asked[id(source.document_kv)]
    policy = _OnPolicyContinuations(model, self_study_ids, length) if on_policy else None
    timings["self_study"] = time.perf_counter() - start

    generator = torch.Generator().manual_seed(seed)
    num_layers = model.config.num_hidden_layers
    plan = LayerPlan(method, budget, fractions, max_queries_per_head, keep_first, head_proportions, max_ratio_per_head,
                     options, compact_windows)
    keys, values, betas = [], [], []
    for layer in tqdm(range(num_layers), desc=f"compacting ({method})", disable=not progress):
        # The model's own softmax scale (Gemma's query_pre_attn_scalar differs from 1/sqrt(head_dim)).
        scale = getattr(model.model.layers[layer].self_attn, "scaling", None)
        on_policy_queries = None
        if policy is not None and (compact_windows or not sliding[layer]):
            start = time.perf_counter()
            on_policy_queries = policy.queries(layer, *sources[0].document_kv[layer])
            timings["self_study"] += time.perf_counter() - start

        if sliding[layer]:  # the window of the document's last tokens (KV chunking), verbatim or compacted
            window_keys, window_values = sources[0].document_kv[layer]
            window_queries = (_reference_queries(model, plan, sources[0], layer, span, on_policy_queries, generator)
                              if compact_windows else None)
            start = time.perf_counter()
            layer_keys, layer_values, layer_beta = plan.compact_window(
                window_keys, window_values, window_queries, len(span), layer, num_layers, scale)
            timings["selection"] += time.perf_counter() - start
        else:
            pieces = []
            for source in sources:
                chunk = source.positions
                layer_keys, layer_values = source.document_kv[layer]
                result = plan.compact_span(
                    layer_keys[:, chunk.start : chunk.stop], layer_values[:, chunk.start : chunk.stop],
                    _reference_queries(model, plan, source, layer, chunk, on_policy_queries, generator), len(span),
                    chunk, layer, num_layers, scale,
                )
                for stage, seconds in result.timings.items():
                    timings[stage] += seconds
                pieces.append(dataclasses.replace(result, keys=_shift_rope(model, result.keys, source.rope_shift)))
            layer_keys, layer_values, layer_beta = assemble_layer(head[layer], pieces, tail[layer])
        keys.append(layer_keys)
        values.append(layer_values)
        betas.append(layer_beta)
        if policy is not None:
            start = time.perf_counter()
            policy.advance(layer, keys[-1], values[-1], betas[-1])
            timings["self_study"] += time.perf_counter() - start

    keys, values, betas = pad_layers(keys, values, betas, fixed=sliding)
    return CompactedPrefix(
        keys=keys,
        values=values,
        beta=betas,
        logical_length=length,
        token_ids=ids,
        fingerprint=model_fingerprint(model),
        method=method,
        config={
            "budget": budget, "query_source": fractions, "keep_first": keep_first, "keep_last": keep_last,
            "chunk_size": chunk_size, "chunking": chunking, "nonuniform_heads": head_proportions is not None,
            "self_study_sequences": len(self_study_ids or ()), "questions": len(question_ids or ()), "on_policy": on_policy,
            "max_queries_per_head": max_queries_per_head, "compact_windows": compact_windows, "seed": seed,
            "options": dict(options),
        },
        timings={f"{stage}_seconds": seconds for stage, seconds in timings.items()},
    )


def prefix_cache(prefix: CompactedPrefix, model: PreTrainedModel, batch_size: int = 1) -> DynamicCache:
    """A transformers cache holding the compacted slots of every layer, for ``batch_size`` sequences."""
    if prefix.fingerprint != model_fingerprint(model):
        raise ValueError("this compacted prefix was made for another model (fingerprint mismatch)")
    if prefix.num_layers != model.config.num_hidden_layers:
        raise ValueError(f"prefix has {prefix.num_layers} layers, the model {model.config.num_hidden_layers}")
    parameter = next(model.parameters())
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        expand = lambda t: t.to(parameter).unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()
        cache.update(expand(k), expand(v), layer)
    return cache


def _visible_beta(layer, beta: torch.Tensor) -> torch.Tensor | None:
    """The beta of the prefix slots still at the start of ``layer``'s attention this call, None when there
    is none to add (a verbatim window: transformers' own mask serves it). A sliding-window cache layer has
    dropped the slots more than a window behind (transformers' sliding mask, on physical cache positions
    as SGLang's, would hide them anyway), so its first columns are the later slots."""
    if getattr(layer, "is_sliding", False):
        beta = beta[:, max(0, layer.cumulative_length - (layer.sliding_window - 1)) :]
        return beta if bool(beta.ne(0).any()) else None
    return beta


def forward_after_prefix(
    model: PreTrainedModel,
    prefix: CompactedPrefix,
    input_ids: torch.Tensor,
    cache: DynamicCache | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DynamicCache]:
    """Logits ``[B, L, V]`` of ``input_ids`` ``[B, L]`` following the compacted document, and the cache.

    Tokens sit at physical cache index t, t+1, ... and, unless ``position_ids`` says otherwise, take
    RoPE positions T, T+1, ... (the logical length). ``attention_mask`` ``[B, cache + L]`` marks padding
    with 0. Pass the returned cache back to continue.
    """
    use_sglang_am_attention(model)
    batch, length = input_ids.shape
    cache = prefix_cache(prefix, model, batch) if cache is None else cache
    if position_ids is None:
        after = cache.get_seq_length(0) - prefix.layer_slots[0]  # tokens already run after the prefix
        start = prefix.logical_length + after
        position_ids = torch.arange(start, start + length, device=input_ids.device).expand(batch, length)
    device = next(model.parameters()).device
    betas = [_visible_beta(layer, beta.to(device)) for layer, beta in zip(cache.layers, prefix.beta)]
    with torch.no_grad(), prefix_bias(betas):
        out = model(
            input_ids, attention_mask=attention_mask, past_key_values=cache, position_ids=position_ids, use_cache=True
        )
    return out.logits, out.past_key_values


def greedy_generate(
    model: PreTrainedModel,
    prefix: CompactedPrefix,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Greedy answers to many prompts (ragged token lists) sharing one compacted document, in one batch.

    Prompts are left-padded; padding is masked and each prompt's tokens take positions T, T+1, ....
    An answer stops after ``eos_token_id`` (kept) or at ``max_new_tokens``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be non-empty token lists")
    if len({len(p) for p in prompts}) > 1 and any(_sliding_layers(model)):
        raise ValueError("ragged prompts need a model without sliding-window layers; batch equal lengths")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    pads = torch.tensor([longest - len(p) for p in prompts], device=device)
    input_ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
    steps = torch.arange(longest, device=device).unsqueeze(0) - pads.unsqueeze(1)
    mask = None  # equal lengths need no padding mask (and window layers could not take a shared one)
    if bool(pads.any()):
        prefix_columns = torch.ones(len(prompts), prefix.num_slots, dtype=torch.long, device=device)
        mask = torch.cat([prefix_columns, (steps >= 0).long()], dim=1)
    positions = prefix.logical_length + steps.clamp(min=0)
    logits, cache = forward_after_prefix(model, prefix, input_ids, attention_mask=mask, position_ids=positions)
    answers = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        next_tokens = logits[:, -1].argmax(dim=-1)
        for row, token in enumerate(next_tokens.tolist()):
            if not finished[row]:
                answers[row].append(token)
                finished[row] = token == eos_token_id
        if all(finished) or step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = forward_after_prefix(
            model, prefix, next_tokens.unsqueeze(1), cache, attention_mask=mask, position_ids=positions
        )
    return answers
