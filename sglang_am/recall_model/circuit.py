"""An explicit two-layer induction circuit for key-value recall, the recall model's starting weights.

Training the lookup from random weights stalls on this CPU: in every configuration we tried (2-4
layers, learning rates 1e-3 to 1e-2, dense or sparse questions, tied or untied embeddings) the model
learns within minutes to answer with *some* value of the document but not to bind values to keys,
and stays there for the thousands of steps that fit in 30 minutes. So the weights start from the
circuit the task needs (Olsson et al., 2022), written out below. The training run that follows starts
near zero loss and changes the weights little: the model is essentially constructed, and its
attention is the sharp lookup of an ideal recall model rather than a pretrained model's.

- residual subspaces (hidden size 128): A = dims 0-15 hold a key's code, B = 16-31 the code of the
  previous token, C = 32-63 a value word's code, D = 64-95 the recalled value, E = 96-127 other tokens;
- layer 0, KV head 0 is a previous-token head: constant query/key biases whose RoPE phases peak at
  relative position -1 (the fastest rotary frequencies); it copies A of the previous token into B;
- layer 1, KV head 0 is the lookup head: the query reads the current key's code (A), the key reads
  B, both on the slowest rotary frequencies so the match does not depend on distance; it copies the
  matching value's code (C) into D, which the output head reads as value logits.

Every other head, both MLPs and the other output rows start at zero. Key and value codes are unit
vectors spread apart by a short optimisation of their largest pairwise cosine.
"""

from __future__ import annotations

import math

import torch

KEY_DIMS, PREVIOUS_DIMS, VALUE_DIMS, RECALLED_DIMS, OTHER_DIMS = (
    range(0, 16), range(16, 32), range(32, 64), range(64, 96), range(96, 128)
)
HIDDEN_SIZE, HEAD_DIM = 128, 32
POSITION_PAIRS = (0, 1, 2)  # rotary pairs used by the previous-token head (fastest frequencies)
CONTENT_PAIRS = tuple(range(8, 16))  # rotary pairs used by the lookup head (slowest frequencies)
ROPE_THETA = 1e8  # makes the slowest 8 pairs turn by < 0.2 rad over 2k tokens
PREVIOUS_TOKEN_NORM = 4.0  # q/k-norm gain: logit margin ~15 nats for the previous token over its neighbours
LOOKUP_NORM = 2.5  # q/k-norm gain: a matching key scores ~35, an unrelated one <= 35 * coherence
VALUE_LOGIT_SCALE = 2.0


def spread_codes(count: int, dims: int, generator: torch.Generator, steps: int = 300) -> torch.Tensor:
    """``count`` unit vectors in ``dims`` dimensions with a small largest pairwise |cosine|."""
    codes = torch.randn(count, dims, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([codes], lr=0.02)
    off_diagonal = ~torch.eye(count, dtype=torch.bool)
    with torch.enable_grad():
        for _ in range(steps):
            unit = torch.nn.functional.normalize(codes, dim=1)
            cosine = (unit @ unit.T)[off_diagonal]
            loss = torch.logsumexp(20 * cosine.abs(), dim=0)  # a soft maximum of |cosine|
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return torch.nn.functional.normalize(codes.detach(), dim=1)


def _pair_dims(pairs: tuple[int, ...]) -> list[int]:
    """Head dims of rotary pairs in transformers' half-split layout: pair i is dims i and i + D/2."""
    return [*pairs, *(p + HEAD_DIM // 2 for p in pairs)]


@torch.no_grad()
def install_recall_circuit(model, key_ids: list[int], value_ids: list[int], seed: int = 0) -> None:
    """Overwrite ``model``'s weights (a 2-layer Qwen3, hidden 128, head_dim 32, attention biases, untied
    embeddings, rope_theta ``ROPE_THETA``) with the recall circuit."""
    config = model.config
    expected = dict(hidden_size=HIDDEN_SIZE, head_dim=HEAD_DIM, num_hidden_layers=2, attention_bias=True,
                    tie_word_embeddings=False)
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong or config.rope_parameters["rope_theta"] != ROPE_THETA:
        raise ValueError(f"the recall circuit needs {expected} and rope_theta={ROPE_THETA}; got {wrong}")
    generator = torch.Generator().manual_seed(seed)
    key_codes = spread_codes(len(key_ids), len(KEY_DIMS), generator)
    value_codes = spread_codes(len(value_ids), len(VALUE_DIMS), generator)

    for parameter in model.parameters():
        parameter.zero_()
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            parameter.fill_(1.0)
    embed = model.model.embed_tokens.weight
    other = torch.nn.functional.normalize(torch.randn(embed.shape[0], len(OTHER_DIMS), generator=generator), dim=1)
    embed[:, OTHER_DIMS.start : OTHER_DIMS.stop] = other
    embed[key_ids] = 0.0
    embed[value_ids] = 0.0
    embed[key_ids, KEY_DIMS.start : KEY_DIMS.stop] = key_codes
    embed[value_ids, VALUE_DIMS.start : VALUE_DIMS.stop] = value_codes

    # Layer 0: query head 0 / KV head 0 attends to the previous token by position alone.
    first = model.model.layers[0].self_attn
    inverse_frequency = ROPE_THETA ** (-torch.arange(HEAD_DIM // 2, dtype=torch.float32) * 2 / HEAD_DIM)
    query, key = torch.zeros(HEAD_DIM), torch.zeros(HEAD_DIM)
    for pair in POSITION_PAIRS:
        query[pair] = 1.0
        # The key's phase leads by one step, so q(m) . k(n) peaks at n = m - 1 after RoPE.
        key[pair] = math.cos(inverse_frequency[pair])
        key[pair + HEAD_DIM // 2] = math.sin(inverse_frequency[pair])
    first.q_proj.bias[:HEAD_DIM] = query
    first.k_proj.bias[:HEAD_DIM] = key
    position_dims = _pair_dims(POSITION_PAIRS)
    first.q_norm.weight[position_dims] = PREVIOUS_TOKEN_NORM
    first.k_norm.weight[position_dims] = PREVIOUS_TOKEN_NORM
    # Its value is the previous token's key code; written to B at unit size (the normed input has norm sqrt(128)).
    for i, dim in enumerate(KEY_DIMS):
        first.v_proj.weight[i, dim] = 1.0
        first.o_proj.weight[PREVIOUS_DIMS[i], i] = 1.0 / math.sqrt(HIDDEN_SIZE)

    # Layer 1: query head 0 / KV head 0 matches the current key's code against B, on slow frequencies.
    second = model.model.layers[1].self_attn
    content_dims = _pair_dims(CONTENT_PAIRS)
    for i, head_dim in enumerate(content_dims):
        second.q_proj.weight[head_dim, KEY_DIMS[i]] = 1.0
        second.k_proj.weight[head_dim, PREVIOUS_DIMS[i]] = 1.0
    second.q_norm.weight[content_dims] = LOOKUP_NORM
    second.k_norm.weight[content_dims] = LOOKUP_NORM
    # It copies the matched value's code into D; the value position's normed residual carries it at
    # norm 8 (two unit parts, C and B, normed to sqrt(128)), so D receives it at unit size.
    for i, dim in enumerate(VALUE_DIMS):
        second.v_proj.weight[i, dim] = 1.0
        second.o_proj.weight[RECALLED_DIMS[i], i] = 1.0 / 8.0

    # Output: value logits from D (the final norm scales the two unit parts, A and D, to norm 8 each).
    model.lm_head.weight[value_ids, RECALLED_DIMS.start : RECALLED_DIMS.stop] = VALUE_LOGIT_SCALE * value_codes
