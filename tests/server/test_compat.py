"""``compat``: the installed SGLang passes its checks, and a check that fails names what changed; models the
server cannot serve documents for are refused with the reason."""

import re
from types import SimpleNamespace

import pytest
import torch

from sglang_am.server.compat import (
    FLASHINFER_ATTRIBUTES,
    FLASHINFER_SIGNATURES,
    HOOKED_ATTRIBUTES,
    SGLANG_VERSION,
    TouchedAttribute,
    check_compacted_windows,
    check_model,
    check_sglang,
)
from sglang_am.server.errors import DocumentError

_TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"


class _Pool:
    declared = None

    def __init__(self):
        self.first, self.second = 0, 0


class _LargerPool(_Pool):
    def grow(self, other):
        self.third: int = 0
        self.fourth += 1  # needs one already: not an assignment of it
        other.elsewhere = 0  # another object's attribute, not the class's


def _not_found(*names: str) -> str:
    return re.escape(f"sglang {SGLANG_VERSION}: {'; '.join(names)} not found; sglang-am needs sglang=={SGLANG_VERSION}")


def test_the_installed_sglang_passes():
    check_sglang()


def test_the_installed_flashinfer_passes():
    from sglang.srt.layers.attention import flashinfer_backend

    # SGLang's module names FlashInfer's wrappers only where FlashInfer runs (a GPU); FlashInfer's own classes, always.
    runs = hasattr(flashinfer_backend, "BatchPrefillWithPagedKVCacheWrapper")
    check_sglang(signatures=FLASHINFER_SIGNATURES if runs else {},
                 attributes=tuple(a for a in FLASHINFER_ATTRIBUTES if runs or a.owner.startswith("flashinfer.")))


@pytest.mark.parametrize("owner, name", [
    (_TOKENIZER_MANAGER, "_result_dispatcher"),  # channel
    ("starlette.routing.Router", "lifespan_context"),  # run_during_lifespan
    ("sglang.srt.layers.attention.triton_backend.TritonAttnBackend", "sliding_window_size"),  # triton_attention
    ("sglang.srt.layers.attention.flashinfer_backend", "BatchPrefillWithPagedKVCacheWrapper"),  # flashinfer_attention
    ("sglang.srt.layers.attention.flashinfer_backend", "BatchDecodeWithPagedKVCacheWrapper"),
])
def test_the_members_sglang_am_replaces_are_listed(owner, name):
    assert TouchedAttribute(owner, name, "replace") in HOOKED_ATTRIBUTES + FLASHINFER_ATTRIBUTES


def test_a_member_sglang_stops_assigning_is_named(monkeypatch):
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    monkeypatch.setattr(TokenizerManager, "init_request_dispatcher", lambda self: None)
    with pytest.raises(RuntimeError, match=_not_found(f"{_TOKENIZER_MANAGER}._result_dispatcher (which sglang-am replaces)")):
        check_sglang()


def test_instance_attributes_are_those_a_method_of_the_class_or_a_base_assigns():
    owner = f"{__name__}._LargerPool"
    assigned = ("declared", "first", "second", "third")
    check_sglang(signatures={}, attributes=tuple(TouchedAttribute(owner, name) for name in assigned))
    unassigned = (TouchedAttribute(owner, "first"), TouchedAttribute(owner, "fourth"), TouchedAttribute(owner, "elsewhere"))
    with pytest.raises(RuntimeError, match=_not_found(f"{owner}.fourth (which sglang-am reads)",
                                                      f"{owner}.elsewhere (which sglang-am reads)")):
        check_sglang(signatures={}, attributes=unassigned)


def test_an_attribute_sglang_am_adds_must_be_absent_from_sglang():
    attributes = (TouchedAttribute(f"{__name__}._LargerPool", "third", "add"),
                  TouchedAttribute(f"{__name__}._LargerPool", "fifth", "add"))
    with pytest.raises(RuntimeError, match=re.escape(f"{__name__}._LargerPool.third already exist")):
        check_sglang(signatures={}, attributes=attributes)
    assert TouchedAttribute("sglang.srt.managers.schedule_batch.Req", "am", "add") in HOOKED_ATTRIBUTES


def test_every_missing_attribute_and_owner_is_named():
    attributes = (
        TouchedAttribute("sglang.srt.managers.scheduler.Scheduler", "tree_cache"),
        TouchedAttribute("sglang.srt.managers.scheduler.Scheduler", "no_such_member", "replace"),
        TouchedAttribute("sglang.srt.entrypoints.http_server", "no_such_state"),
        TouchedAttribute("sglang.srt.no_such_module.Thing", "anything"),
    )
    with pytest.raises(RuntimeError) as raised:
        check_sglang(signatures={}, attributes=attributes)
    message = str(raised.value)
    assert "Scheduler.no_such_member (which sglang-am replaces)" in message
    assert "http_server.no_such_state (which sglang-am reads)" in message
    assert "sglang.srt.no_such_module.Thing (" in message and "tree_cache" not in message


def test_the_signature_check_names_the_version_and_the_target():
    with pytest.raises(RuntimeError, match=re.escape(f"needs sglang==9.9.9, found sglang {SGLANG_VERSION}")):
        check_sglang(expected_version="9.9.9")
    target = "sglang.srt.mem_cache.registry.register_radix_cache_backend"
    with pytest.raises(RuntimeError, match=re.escape(f"{target}('name', 'factory') differs from the expected ('name',)")):
        check_sglang(signatures={target: ("name",)}, attributes=())
    with pytest.raises(RuntimeError, match="has no sglang.srt.mem_cache.registry.no_such_function"):
        check_sglang(signatures={"sglang.srt.mem_cache.registry.no_such_function": ()}, attributes=())


@pytest.mark.parametrize(("hybrid_pool", "chunk", "compacted_windows_served"), [(True, None, True), (False, 8192, True),
                                                                                (False, None, False)])
def test_models_the_layout_cannot_serve_are_refused_with_the_reason(hybrid_pool, chunk, compacted_windows_served):
    """Models on SGLang's hybrid sliding-window pool (gpt-oss, Gemma-4, Llama-4) or with chunked attention,
    whose weights cannot be had here: the runner's flags that SGLang sets for them, on a stand-in runner.
    A backend without compacted-window support refuses those documents only."""
    backend = SimpleNamespace(adds_document_bias=True, serves_compacted_windows=compacted_windows_served)
    runner = SimpleNamespace(attn_backend=backend, spec_algorithm=SimpleNamespace(is_none=lambda: True),
                             is_hybrid_swa=hybrid_pool, model_config=SimpleNamespace(attention_chunk_size=chunk),
                             token_to_kv_pool=SimpleNamespace(k_buffer=[], store_dtype=torch.float32, dtype=torch.float32))
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=runner))
    if compacted_windows_served:
        with pytest.raises(DocumentError, match="hybrid sliding-window pool or chunked attention") as error:
            check_model(scheduler)
        assert error.value.status == 400
    else:
        check_model(scheduler)
        with pytest.raises(DocumentError, match="torch_native only"):
            check_compacted_windows(runner)
