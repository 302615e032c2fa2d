"""The SGLang side of sglang-am: CPU serving support now; the compaction extension builds on it."""
