"""GPU kernel paths of sglang-am, installed as ``sglang_am.kernels``.

- ``bias_table``: the Triton ``score_mod`` that adds a compacted document's beta inside SGLang's
  Triton extend/decode attention kernels, and the static buffer it reads.
- ``flashinfer_bias``: a FlashInfer JIT attention variant adding the same beta (paged prefill/decode).
- ``key_scores``: Triton kernels for the solver's per-query row max and per-key attention scores.
- ``attention_targets``: the solver's attention outputs and log-sum-exp via FlashInfer.

Each has a torch twin in ``sglang_am`` that is its oracle (``sglang_am.server.sglang_hooks.attention`` and
``sglang_am.core.block``); ``tests/test_kernels.py`` runs the Triton kernels under
``TRITON_INTERPRET=1`` on CPU tensors, ``benchmarks/gpu_check.py`` runs every path on a GPU.
Importing this package imports neither triton nor flashinfer.
"""
