"""Tier 1: the ROS-free core, no model (pure Python, fast)."""

import threading

import pytest

from slm_ros.core.errors import ConfigError, RequestError
from slm_ros.core.session import SessionStore, Turn, build_messages, fit_prompt
from slm_ros.core.streaming import IncrementalDetokenizer, StopStringFilter, iterate_in_thread
from slm_ros.core.types import SamplingOverrides, SamplingParams


# -- streaming ---------------------------------------------------------------------------------

def byte_decode(ids):
    """A byte-level 'tokenizer': token id = one byte, decoded like HF byte-level BPE decoders do."""
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["héllo wörld", "robot 🤖 sees 世界", "𝄞 clef", "plain ascii"])
def test_detokenizer_never_splits_utf8(text):
    detok = IncrementalDetokenizer(byte_decode)
    deltas = [detok.push(b) for b in text.encode("utf-8")] + [detok.flush()]
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # whole characters only
    assert "".join(deltas) == text
    # a 4-byte emoji comes out in one piece, after its last byte
    if "🤖" in text:
        assert "🤖" in deltas or any("🤖" in d for d in deltas)


def test_detokenizer_drops_incomplete_tail():
    detok = IncrementalDetokenizer(byte_decode)
    out = detok.push(ord("a")) + detok.push(0xF0) + detok.push(0x9F)  # start of a 4-byte char
    assert out == "a"
    assert detok.flush() == ""


@pytest.mark.parametrize("stops,pieces,expected,stopped", [
    (["STOP"], ["Hello ", "ST", "OP and more"], "Hello ", True),
    (["STOP"], ["Hello ", "ST", "ART"], "Hello START", False),
    (["\n\n", "User:"], ["a\n", "\nb"], "a", True),
    ([], ["x", "y"], "xy", False),
    (["abc"], ["zab"], "zab", False),
])
def test_stop_filter(stops, pieces, expected, stopped):
    f = StopStringFilter(stops)
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    assert out == expected and f.stopped == stopped


def test_stop_filter_holds_back_partial_stop():
    f = StopStringFilter(["<end>"])
    assert f.feed("text <e") == "text "
    assert f.feed("n") == ""
    assert f.feed("x") == "<enx"


def test_iterate_in_thread_yields_in_order_and_raises_producer_errors():
    cancel = threading.Event()

    def produce(emit):
        for i in range(100):
            emit(i)

    assert list(iterate_in_thread(produce, cancel, maxsize=4)) == list(range(100))

    def broken(emit):
        emit(1)
        raise ValueError("model exploded")

    with pytest.raises(ValueError, match="model exploded"):
        list(iterate_in_thread(broken, threading.Event()))


def test_iterate_in_thread_early_exit_stops_producer():
    cancel = threading.Event()
    produced = []

    def produce(emit):
        i = 0
        while not cancel.is_set():
            emit(i)
            produced.append(i)
            i += 1

    for item in iterate_in_thread(produce, cancel, maxsize=2):
        if item == 5:
            break
    assert cancel.is_set()
    assert len(produced) < 20  # bounded queue: the producer never ran far ahead


# -- sampling validation -------------------------------------------------------------------------

@pytest.mark.parametrize("fields,match", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": -0.1}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"stop": ("",)}, "stop entries must be non-empty"),
])
def test_invalid_sampling_names_the_field(fields, match):
    with pytest.raises(RequestError, match=match):
        SamplingOverrides(**fields)


def test_zero_fields_take_node_defaults():
    defaults = SamplingParams(max_new_tokens=100, temperature=0.7, top_p=0.9, top_k=40,
                              repetition_penalty=1.2, seed=7, stop=("###",))
    assert SamplingOverrides().resolve(defaults) == defaults
    got = SamplingOverrides(max_new_tokens=5, top_k=1, stop=("x",)).resolve(defaults)
    assert (got.max_new_tokens, got.top_k, got.stop, got.temperature) == (5, 1, ("x",), 0.7)
    assert got.greedy


def test_invalid_defaults_are_config_errors():
    with pytest.raises(ConfigError, match="default_top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="default_temperature"):
        SamplingParams(temperature=-1.0)


# -- sessions ----------------------------------------------------------------------------------

def word_template(messages):
    """One 'token' per word plus 2 per message (stand-in for a chat template's overhead)."""
    return [0] * sum(len(m["content"].split()) + 2 for m in messages)


def test_session_store_keeps_last_turns_and_resets():
    store = SessionStore(max_turns=2)
    for i in range(5):
        store.append("s", Turn(f"q{i}", f"a{i}"))
    assert [t.user for t in store.history("s")] == ["q4"]   # q0 q1 | q2 q3 | q4
    assert store.history("other") == []
    store.reset("s")
    assert store.history("s") == []


def test_session_store_trims_in_blocks_so_the_prefix_stays_stable():
    store = SessionStore(max_turns=8)
    seen = []
    for i in range(24):
        store.append("s", Turn(f"q{i}", f"a{i}"))
        seen.append([t.user for t in store.history("s")])
    assert all(4 <= len(h) <= 8 for h in seen[4:]) and max(len(h) for h in seen) == 8
    # Between two trims each history extends the previous one: the prompt's start is unchanged.
    changed = [i for i in range(1, 24) if seen[i][:len(seen[i - 1])] != seen[i - 1]]
    assert changed == [8, 13, 18, 23], changed
    assert seen[8] == ["q5", "q6", "q7", "q8"]


def test_ten_thousand_sessions_keep_memory_bounded():
    """10,000 distinct session ids with a 1 KB turn each: the store keeps the 256 most recently
    used (the engine's default), so what it holds stays at about 256 turns' worth."""
    import tracemalloc
    store = SessionStore(max_turns=8)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):
            store.append(f"session-{i}", Turn("q" * 512, "a" * 512))
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(store) == 256 and store.history("session-9999") and not store.history("session-0")
    assert held < 256 * 4096, held   # ~1.2 KB per kept session; 10,000 would be ~12 MB


_RSS_SCRIPT = """
import sys
from slm_ros.core.session import SessionStore, Turn

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

store = SessionStore(**({} if sys.argv[1] == "default" else {"max_sessions": 10**9}))
for i in range(1000):
    store.append(f"warm-{i}", Turn(f"{i}" + "q" * 4096, f"{i}" + "a" * 4096))
base = rss_kb()
for i in range(10000):
    store.append(f"session-{i}", Turn(f"{i}" + "q" * 4096, f"{i}" + "a" * 4096))
print(rss_kb() - base)
"""


def test_ten_thousand_sessions_keep_the_process_rss_bounded():
    """The same burst measured as the process sees it (RSS, in a fresh interpreter): 10,000 session
    ids with an 8 KB turn each add almost nothing with the default cap, ~80 MB without one."""
    import subprocess
    import sys

    def growth_mb(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode], check=True,
                             capture_output=True, text=True).stdout
        return int(out) / 1024

    bounded, unbounded = growth_mb("default"), growth_mb("unbounded")
    assert unbounded > 60, unbounded   # the measurement sees an unbounded store
    assert bounded < 8, (bounded, unbounded)


def test_session_store_bounds_sessions():
    store = SessionStore(max_turns=1, max_sessions=3)
    for i in range(5):
        store.append(f"s{i}", Turn("q", "a"))
    assert len(store) == 3 and store.history("s0") == [] and store.history("s4")


def test_fit_prompt_trims_oldest_history_first():
    history = [Turn("one two three", "four five six"), Turn("seven", "eight"), Turn("nine", "ten")]
    ids, used, budget = fit_prompt(word_template, "", history, "final question", 40, 20)
    messages = build_messages("", history[len(history) - used:], "final question")
    assert used == 2 and len(ids) == len(word_template(messages)) and budget == 20
    # the kept turns are the newest ones
    assert messages[0]["content"] == "seven"


def test_fit_prompt_never_truncates_the_prompt():
    long_prompt = " ".join(["word"] * 50)
    with pytest.raises(RequestError, match="prompt is too long: 52 tokens"):
        fit_prompt(word_template, "", [Turn("a", "b")], long_prompt, 40, 10)


def test_fit_prompt_clamps_the_answer_budget():
    ids, used, budget = fit_prompt(word_template, "sys", [], "a b c", 20, 100)
    assert used == 0 and budget == 20 - len(ids)


def test_nul_characters_never_reach_a_ros_string():
    """A model can emit a NUL byte token; ROS strings end at NUL, so the detokenizer turns it into
    U+FFFD (a vision test once saw a result text cut at a generated NUL)."""
    pieces = {1: "ab", 2: "\x00", 3: "c"}
    detok = IncrementalDetokenizer(lambda ids: "".join(pieces[i] for i in ids))
    text = "".join(detok.push(t) for t in (1, 2, 3)) + detok.flush()
    assert text == "ab\ufffdc"
