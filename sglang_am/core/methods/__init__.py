"""Registry of compaction methods. Importing this package registers every built-in method."""

from . import controls, h2o, highest_attn_keys, kvzip, omp, pyramidkv, snapkv  # noqa: F401  (registration)
from .base import (
    CompactionOptions,
    EvictionOptions,
    Method,
    Selection,
    available_methods,
    get_method,
    register_method,
)
from .h2o import H2OOptions
from .highest_attn_keys import HighestAttnKeysOptions
from .kvzip import KVzipOptions, KVzipUniformOptions
from .omp import PROGRESSIVE_SCHEDULE, OMPFastOptions, OMPOptions
from .pyramidkv import PyramidKVOptions, pyramid_layer_budget
from .snapkv import SnapKVOptions

__all__ = [
    "PROGRESSIVE_SCHEDULE",
    "CompactionOptions",
    "EvictionOptions",
    "H2OOptions",
    "HighestAttnKeysOptions",
    "KVzipOptions",
    "KVzipUniformOptions",
    "Method",
    "OMPFastOptions",
    "OMPOptions",
    "PyramidKVOptions",
    "Selection",
    "SnapKVOptions",
    "available_methods",
    "get_method",
    "pyramid_layer_budget",
    "register_method",
]
