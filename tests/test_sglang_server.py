"""SGLang 0.5.23 serving on this CPU: the sgl_kernel stand-in, the launcher, and a real server on loopback
answering recall questions with the embedded model."""

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

from sglang_am.client import http_json
from sglang_am.recall_model import default_model_path, recall_task
from sglang_am.serve import launch_command, serving, stock_command
from sglang_am.server.cpu import SHIM_DIR, bind_rank_threads, cpu_environment, cpu_server_flags


def _standin():
    spec = importlib.util.spec_from_file_location(
        "sgl_kernel_standin", SHIM_DIR / "sgl_kernel" / "__init__.py",
        submodule_search_locations=[str(SHIM_DIR / "sgl_kernel")],
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standin_assigns_cache_locations_in_request_order():
    kernel = _standin()
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    out_cache_loc = torch.arange(100, 107, dtype=torch.int64)
    kernel.assign_req_to_token_pool_cpu(
        torch.tensor([2, 0, 3]), req_to_token, torch.tensor([1, 0, 5]), torch.tensor([4, 0, 9]), out_cache_loc, 10
    )
    assert req_to_token[2, 1:4].tolist() == [100, 101, 102] and req_to_token[0].tolist() == [0] * 10
    assert req_to_token[3, 5:9].tolist() == [103, 104, 105, 106] and req_to_token.dtype == torch.int32


def test_standin_copies_rows_of_every_buffer_reading_sources_first():
    kernel = _standin()
    buffers = [torch.arange(24, dtype=torch.bfloat16).reshape(6, 4), torch.arange(60, dtype=torch.float32).reshape(6, 10)]
    expected = [b.clone() for b in buffers]
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 5])  # overlapping: row 1 is read and written
    for e in expected:
        e[tgt] = e[src].clone()
    pointers = torch.tensor([b.data_ptr() for b in buffers])
    strides = torch.tensor([b.stride(0) * b.element_size() for b in buffers])
    kernel.copy_all_layer_kv_cache_cpu(pointers, strides, tgt, src)
    for buffer, want in zip(buffers, expected):
        assert torch.equal(buffer, want)


def test_standin_stubs_only_cpu_names():
    kernel = _standin()
    with pytest.raises(NotImplementedError, match="verify_tree_greedy_cpu"):
        kernel.verify_tree_greedy_cpu()
    with pytest.raises(AttributeError):
        kernel.flash_attn_varlen_func  # noqa: B018  (non-CPU names stay missing for SGLang's fallbacks)


def test_launcher_fills_in_model_plugin_and_cpu_settings():
    command, env = launch_command(["--port", "1234"])
    assert command[1:3] == ["-m", "sglang.launch_server"]
    assert command[command.index("--model-path") + 1] == str(default_model_path())
    assert command[command.index("--radix-cache-backend") + 1] == "am" and env["SGLANG_AM"] == "1"
    assert "--disable-overlap-schedule" in command
    assert command[command.index("--attention-backend") + 1] == ("triton" if torch.cuda.is_available() else "torch_native")
    assert "--radix-cache-backend" not in launch_command(["--disable-radix-cache"])[0]
    if not torch.cuda.is_available():
        assert command[command.index("--device") + 1] == "cpu"
        assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(SHIM_DIR)
        assert env["SGLANG_AM_FORK_SUBPROCESSES"] == "1"
        assert "SGLANG_AM_FORK_SUBPROCESSES" not in stock_command(["--model-path", "m"])[1]  # stock spawns, as shipped
    flags = cpu_server_flags(["--attention-backend=triton", "--mem-fraction-static", "0.1"])
    assert "torch_native" not in flags and "--max-total-tokens" not in flags and "--device" in flags
    assert flags.count("--sleep-on-idle") == 1 and None not in flags
    assert cpu_server_flags(["--sleep-on-idle"]).count("--sleep-on-idle") == 1
    assert cpu_environment({"PYTHONPATH": "/x"})["PYTHONPATH"] == os.pathsep.join([str(SHIM_DIR), "/x"])


def test_several_cpu_ranks_get_their_own_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in bind_rank_threads(["--dp-size", "1"], {})
    assert bind_rank_threads(["--dp-size", "2"], {})["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert bind_rank_threads(["--dp=2", "--tp-size", "2"], {})["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1|2|3"
    assert bind_rank_threads(["--dp-size", "2"], {"SGLANG_CPU_OMP_THREADS_BIND": "4|3"})["SGLANG_CPU_OMP_THREADS_BIND"] == "4|3"
    with pytest.raises(SystemExit, match="at least 6 CPU cores"):
        bind_rank_threads(["--dp-size", "6"], {})


def test_launcher_picks_the_attention_backend_by_device_unless_forced(monkeypatch):
    import sglang_am.serve as serve

    backend = lambda command: command[command.index("--attention-backend") + 1]
    monkeypatch.setattr(serve, "has_cuda", lambda: True)
    command, env = serve.launch_command([])
    assert backend(command) == "triton" and "--device" not in command and "SGLANG_AM_FORK_SUBPROCESSES" not in env
    command, _ = serve.launch_command(["--attention-backend", "flashinfer"])
    assert command.count("--attention-backend") == 1 and backend(command) == "flashinfer"
    monkeypatch.setattr(serve, "has_cuda", lambda: False)
    assert backend(serve.launch_command([])[0]) == "torch_native"


def test_plugin_is_an_entry_point_and_registers_only_when_enabled(monkeypatch):
    from importlib.metadata import entry_points

    from sglang.srt.mem_cache import registry

    (entry,) = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "am"]
    register = entry.load()
    monkeypatch.setattr(registry, "_RADIX_CACHE_REGISTRY", {})
    monkeypatch.delenv("SGLANG_AM", raising=False)
    register()
    assert registry.registered_radix_cache_backends() == []
    monkeypatch.setenv("SGLANG_AM", "1")
    register()
    register()  # idempotent: SGLang loads plugins in several processes and code paths
    assert registry.registered_radix_cache_backends() == ["am"]


def test_with_the_launchers_fork_variable_sglangs_processes_are_forked_not_spawned():
    """The hook runs after SGLang's ``_set_envs_and_config`` has chosen spawn; a fresh interpreter, so that
    SGLang's hook registry holds only this registration. With CUDA the launcher sets no variable
    (``test_launcher_picks_the_attention_backend_by_device_unless_forced``)."""
    code = """if True:
        import multiprocessing
        from sglang.srt.plugins.hook_registry import HookRegistry
        from sglang_am.server.plugin import register
        register()
        hooks = HookRegistry._hooks.get("sglang.srt.entrypoints.engine._set_envs_and_config", [])
        multiprocessing.set_start_method("spawn", force=True)
        for _, hook, _ in hooks:
            hook(None, "server_args")
        print(len(hooks), multiprocessing.get_start_method())
    """
    env = {**os.environ, "SGLANG_AM": "1", "SGLANG_AM_FORK_SUBPROCESSES": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["1", "fork"]


@pytest.fixture(scope="module")
def server():
    with serving(["--max-total-tokens", "8192", "--dtype", "float32"]) as url:
        yield url


def _post(url: str, payload: dict) -> dict:
    status, body = http_json("POST", url, payload)
    assert status == 200, (status, body)
    return body


@pytest.mark.slow
def test_server_answers_recall_questions_with_the_embedded_model(server):
    (document,) = recall_task(num_pairs=300, num_questions=8, seed=5)
    prompts = [f"{document.text}\n{q.question}" for q in document.questions]
    greedy = {"max_new_tokens": 1, "temperature": 0}
    first = _post(f"{server}/generate", {"text": prompts[0], "sampling_params": greedy})
    rest = _post(f"{server}/generate", {"text": prompts[1:], "sampling_params": greedy})
    answers = [out["text"].strip() for out in [first, *rest]]
    assert answers == [q.answer for q in document.questions]
    # Later requests reuse the document's KV through SGLang's own radix cache (600 document tokens + <bos>).
    assert all(out["meta_info"]["cached_tokens"] >= 600 for out in rest)
    completion = _post(f"{server}/v1/completions", {"model": "default", "prompt": prompts[0], "max_tokens": 1,
                                                     "temperature": 0})
    assert completion["choices"][0]["text"].strip() == document.questions[0].answer
    with urllib.request.urlopen(f"{server}/get_server_info", timeout=30) as response:
        assert json.loads(response.read())["radix_cache_backend"] == "am"  # the plugin's cache served these


@pytest.mark.slow
def test_file_routes_need_an_admin_key_on_a_server_started_without_one(server):
    doc_id = "0" * 64
    for method, path in (("POST", f"/am/documents/{doc_id}/save"), ("POST", f"/am/documents/{doc_id}/load"),
                         ("GET", "/am/store"), ("DELETE", f"/am/store/{doc_id}")):
        status, body = http_json(method, server + path)
        assert status == 403 and "--admin-api-key" in body["error"], (path, status, body)
    assert http_json("GET", server + "/am/documents")[0] == 200  # the other document routes stay open
