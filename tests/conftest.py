import os

import pytest
import torch

# Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors (tests/test_kernels.py,
# and the triton-backend server tests, whose processes inherit it). Set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sglang_am.core.synthetic import clustered_block


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_block():
    """4 heads, T=256, D=32: small enough to run every method many times."""
    return clustered_block(heads=4, length=256, head_dim=32, num_queries=384, num_heldout=128, num_clusters=16, seed=1)
