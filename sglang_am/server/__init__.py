"""The SGLang extension: compacted documents as pinned radix-tree nodes, served with bias-aware attention."""
