import os

import pytest
import torch

# Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors (tests/test_kernels.py,
# and the triton-backend server tests, whose processes inherit it). Set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sglang_am.core.synthetic import clustered_block
from sglang_am.recall_model import default_model_path


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_block():
    """4 heads, T=256, D=32: small enough to run every method many times."""
    return clustered_block(heads=4, length=256, head_dim=32, num_queries=384, num_heldout=128, num_clusters=16, seed=1)


# ----- for the end-to-end tests (tests/test_sglang_*.py); module-scoped like the server each module starts -----

@pytest.fixture(scope="module")
def tokenizer():
    """The embedded recall model's tokenizer, which the servers these tests start use."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """An empty directory for the module's server's ``--am-store-dir``."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The file that ``SGLANG_AM_TEST_FAULTS`` names to the module's server, empty: no fault injected. A test
    writes a fault point into it and empties it again (``sglang_am/server/faults.py`` lists the points)."""
    path = tmp_path_factory.mktemp("faults") / "active"
    path.write_text("")
    return path
