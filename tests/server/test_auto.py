"""Automatic compaction's policy, launcher flags, reuse tracker and eviction order (no server)."""

import dataclasses
import json

import pytest

from sglang_am.serve import am_parser, launch_command, split_am_flags
from sglang_am.server.auto import POLICY_VARIABLE, AutoPolicy, ReuseTracker, eviction_order, policy_from_environment
from sglang_am.server.config import CONFIG_VARIABLE, GiB, ServerConfig

from .samples import document

POLICY = AutoPolicy(min_tokens=8, min_requests=3, window_seconds=10.0, keep_first=2, keep_last=3)
DOC = list(range(100, 120))  # 20 shared tokens


def prompt(question: int) -> list[int]:
    return DOC + [question, question + 1]


def test_three_reuses_within_the_window_propose_the_shared_prefix_minus_the_protected_tail():
    tracker = ReuseTracker(POLICY)
    for i in range(2):
        tracker.observe(prompt(i), rid=f"r{i}", now=float(i))
    assert tracker.take_candidates() == []
    tracker.observe(prompt(7), rid="r7", now=2.0)
    assert tracker.take_candidates() == [DOC[:-3]]


def test_short_prompts_repeats_and_stale_reuses_do_not_count():
    tracker = ReuseTracker(POLICY)
    for i in range(3):  # under min_tokens + keep_last tokens: nothing worth compacting before a suffix
        tracker.observe(DOC[:10], rid=f"short{i}", now=0.0)
    tracker.observe(prompt(1), rid="a", now=0.0)
    tracker.observe(prompt(1), rid="a", now=1.0)  # the same request matched again
    tracker.observe(prompt(2), rid="b", now=20.0)  # "a" is outside the window by now
    assert tracker.take_candidates() == []
    tracker.observe(prompt(3), rid="c", now=21.0)
    assert tracker.take_candidates() == []
    tracker.observe(prompt(4), rid="d", now=22.0)
    assert tracker.take_candidates() == [DOC[:-3]]


def test_a_triggered_prefix_is_quiet_until_its_document_is_installed_or_a_window_passes():
    tracker = ReuseTracker(POLICY)
    for i in range(3):
        tracker.observe(prompt(i), rid=f"r{i}", now=float(i))
    (candidate,) = tracker.take_candidates()
    for i in range(3, 6):  # while its compaction runs
        tracker.observe(prompt(i), rid=f"r{i}", now=float(i))
    assert tracker.take_candidates() == []
    tracker.release(candidate)  # installed; dropped later and reused again
    for i in range(6, 9):
        tracker.observe(prompt(i), rid=f"r{i}", now=float(i))
    assert tracker.take_candidates() == [DOC[:-3]]
    for i in range(20, 23):  # never installed (refused): tracked again after a window
        tracker.observe(prompt(i), rid=f"r{i}", now=float(i))
    assert tracker.take_candidates() == [DOC[:-3]]


def test_prefixes_differing_in_the_first_tokens_are_separate_groups():
    tracker = ReuseTracker(POLICY)
    other = [1] + DOC[1:]
    for i in range(2):
        tracker.observe(prompt(i), rid=f"a{i}", now=0.0)
        tracker.observe(other + [i], rid=f"b{i}", now=0.0)
    assert tracker.take_candidates() == []
    assert len(tracker.groups) == 2


def test_identical_prompts_keep_a_suffix_of_keep_last_tokens():
    tracker = ReuseTracker(POLICY)
    for i in range(3):
        tracker.observe(prompt(0), rid=f"r{i}", now=0.0)
    (candidate,) = tracker.take_candidates()
    assert candidate == prompt(0)[:-3]


@pytest.mark.parametrize("fields, word", [
    ({"min_requests": 0}, "min_requests"), ({"ratio": 1.0}, "ratio"), ({"budget": 1.5}, "budget"),
    ({"budget": 0}, "budget"), ({"keep_last": 0}, "keep_last"),
    ({"min_tokens": 8, "keep_first": 4, "keep_last": 4}, "keep_first"),
    ({"method": "nope"}, "nope"), ({"query_source": "random"}, "query_source"), ({"window_seconds": 0}, "window_seconds"),
    ({"ratio": "half"}, "ratio"), ({"fidelity_bound": 0}, "fidelity_bound"), ({"adapt": "yes"}, "adapt"),
])
def test_bad_policies_name_the_field(fields, word):
    with pytest.raises(ValueError, match=word):
        AutoPolicy(**fields)


def test_budget_is_a_fraction_of_the_pool_or_a_slot_count():
    assert AutoPolicy(budget=0.25).budget_slots(8192) == 2048
    assert AutoPolicy(budget=300).budget_slots(8192) == 300


def test_policy_travels_in_the_environment(monkeypatch):
    monkeypatch.delenv(POLICY_VARIABLE, raising=False)
    assert policy_from_environment() is None
    monkeypatch.setenv(POLICY_VARIABLE, POLICY.to_json())
    assert policy_from_environment() == POLICY
    monkeypatch.setenv(POLICY_VARIABLE, '{"ratio": 2}')
    with pytest.raises(ValueError, match=f"{POLICY_VARIABLE}.*ratio"):
        policy_from_environment()


def test_launcher_turns_am_flags_into_the_config_and_policy_and_passes_the_rest_to_sglang(capsys):
    command, env = launch_command(["--am-auto", "--am-auto-min-requests", "5", "--am-auto-budget", "4096",
                                   "--am-auto-save-evicted", "false", "--am-store-dir", "/tmp/am",
                                   "--am-store-quota-bytes", "2GiB", "--am-solve-timeout", "30", "--am-watch-documents",
                                   "false", "--port", "30001"])
    assert not any(arg.startswith("--am-") for arg in command)
    assert command[command.index("--port") + 1] == "30001"
    policy = json.loads(env[POLICY_VARIABLE])
    assert (policy["min_requests"], policy["budget"], policy["save_evicted"]) == (5, 4096, False)
    config = ServerConfig(**json.loads(env[CONFIG_VARIABLE]))
    assert (config.store_dir, config.store_quota_bytes, config.solve_timeout) == ("/tmp/am", 2 * GiB, 30.0)
    assert config.watch_documents is False and ServerConfig().watch_documents is True
    assert split_am_flags(["--port", "1"]) == (["--port", "1"], None, None)
    assert AutoPolicy().ratio == "auto"  # the fidelity guard picks each prefix's ratio
    _, _, fixed = split_am_flags(["--am-auto", "--am-auto-ratio", "0.2", "--am-auto-adapt", "true"])
    assert (fixed.ratio, fixed.adapt) == (0.2, True)
    assert split_am_flags(["--am-auto", "--am-auto-ratio", "auto", "--am-auto-fidelity-bound", "0.3"])[2] == AutoPolicy(
        ratio="auto", fidelity_bound=0.3)
    with pytest.raises(SystemExit):
        split_am_flags(["--am-auto-ratio", "0.2"])  # without --am-auto
    assert "need --am-auto" in capsys.readouterr().err
    for flags, reason in ((["--am-auto", "--am-auto-ratio", "3"], "ratio must be in (0, 1)"),
                          (["--am-max-registrations", "0"], "max_registrations must be an int >= 1"),
                          (["--am-capture-memory-bytes", "lots"], "not a size"),
                          (["--am-rpc-timeout", "inf"], "rpc_timeout must be a positive number")):
        with pytest.raises(SystemExit):
            split_am_flags(flags)
        assert reason in capsys.readouterr().err


def test_every_am_flag_has_a_sentence_of_help_and_a_metavar_that_names_its_value():
    actions = [action for action in am_parser()._actions if action.option_strings != ["--am-auto"]]
    assert len(actions) == len(dataclasses.fields(ServerConfig)) + len(dataclasses.fields(AutoPolicy))
    for action in actions:
        assert action.metavar in {"N", "BYTES", "SECONDS", "PATH", "RATIO", "ERROR", "FRACTION|N", "FRACTION", "METHOD",
                                  "SOURCE", "BOOL"}, action.option_strings
        assert action.help[0].isupper() and action.help.endswith(").") and "(default " in action.help
    bytes_flags = [action for action in actions if action.option_strings[0].endswith("-bytes")]
    assert bytes_flags and all(action.metavar == "BYTES" for action in bytes_flags)


def test_eviction_takes_the_least_recently_used_idle_automatic_documents():
    old, busy, recent, explicit = (document(i, auto=True, slots=10, last_used=t)
                                   for i, t in ((1, 1.0), (2, 2.0), (3, 3.0), (4, 0.0)))
    explicit.auto = False
    busy.users = 1
    assert eviction_order([old, busy, recent, explicit], budget=30, width=10) == [old]
    assert eviction_order([old, busy, recent, explicit], budget=30, width=20) == [old, recent]
    assert eviction_order([old, busy, recent, explicit], budget=30, width=25) is None  # busy stays
    assert eviction_order([old], budget=30, width=5) == []
