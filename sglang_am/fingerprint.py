"""A model fingerprint: what must match for a compacted prefix to be valid on a model.

The same fingerprint comes from a loaded transformers model (``model_fingerprint``) and from a
checkpoint directory (``checkpoint_fingerprint``, what the SGLang server uses, since its fused layers
have other names): config fields plus a hash of each stored weight's name, shape and first values.
Values are rounded to bfloat16 first, so a float32 load of bfloat16 weights matches its checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
    "layer_types",
)
SAMPLED_VALUES = 16


def model_fingerprint(model: PreTrainedModel) -> dict:
    """Fingerprint of a loaded model; tied weights count once, under their stored name."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    weights = ((name, tuple(tensor.shape), tensor.flatten()) for name, tensor in model.state_dict().items() if name not in tied)
    return _fingerprint(model.config, weights, type(model).__name__)


def checkpoint_fingerprint(model_dir: str | Path) -> dict:
    """Fingerprint of the safetensors checkpoint in ``model_dir``, equal to ``model_fingerprint`` of the
    model loaded from it."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors checkpoint to fingerprint")
    config = AutoConfig.from_pretrained(model_dir)

    def weights():
        for file in files:
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():
                    part = reader.get_slice(name)
                    shape = tuple(part.get_shape())
                    # the leading rows hold the first values; no need to read the whole tensor
                    head = part[: min(shape[0], SAMPLED_VALUES)] if shape else reader.get_tensor(name)
                    yield name, shape, head.flatten()

    return _fingerprint(config, weights(), config.architectures[0] if config.architectures else "")


def _fingerprint(config: PretrainedConfig, weights: Iterable[tuple[str, tuple[int, ...], torch.Tensor]],
                 fallback_name: str) -> dict:
    """``weights``: (name, shape, the tensor's values flattened, at least the first SAMPLED_VALUES)."""
    digest = hashlib.sha256()
    for name, shape, values in sorted(weights, key=lambda item: item[0]):
        digest.update(f"{name}:{shape}".encode())
        sample = values[:SAMPLED_VALUES].detach().to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(sample.numpy().tobytes())
    fields = {name: _plain(getattr(config, name, None)) for name in _CONFIG_FIELDS}
    if fields["head_dim"] is None:
        fields["head_dim"] = config.hidden_size // config.num_attention_heads
    return {
        "architecture": (config.architectures or [fallback_name])[0],
        "model_type": config.model_type,
        **fields,
        "weights_sha256": digest.hexdigest(),
    }


def _plain(value: object) -> object:
    """JSON-comparable form (tuples and nested dicts become lists/dicts of plain values)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
