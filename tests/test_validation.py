import ast
import io
import json
import os
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import get_settings
from app.files import validation
from app.files.validation import LineError, ValidationReport, load_examples, validate_training_file
from tests.helpers import api_process, chat_jsonl, process_mb, upload

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
CHAT_LINE = {"messages": [USER, ASSISTANT]}
PC_LINE = {"prompt": "2+2=", "completion": "4"}
ALPACA_LINE = {"instruction": "Add the numbers.", "input": "2, 2", "output": "4"}
TEXT_LINE = {"text": "Once upon a time."}
PREFERENCE_LINE = {
    "input": {"messages": [USER]},
    "preferred_output": [{"role": "assistant", "content": "Hello!"}],
    "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
}
LABEL_LINE = {"text": "What a lovely flight", "label": "positive"}


def jsonl(*lines: object) -> bytes:
    """Build a file; str items are written verbatim, anything else as JSON."""
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


def single_error(data: bytes) -> LineError:
    report = validate_training_file(data)
    assert not report.ok
    assert report.error_count == 1 and len(report.errors) == 1, report.errors
    return report.errors[0]


def chat(*messages: object) -> dict:
    return {"messages": list(messages)}


# Each case: file lines, expected code, expected line number, words the message must contain.
ERROR_CASES = {
    "invalid_encoding": ([CHAT_LINE, "x"], "invalid_encoding", 2, ["UTF-8"]),
    "invalid_json": ([CHAT_LINE, CHAT_LINE, '{"messages": ['], "invalid_json", 3, ["invalid JSON"]),
    "not_an_object": ([CHAT_LINE, "[1, 2]"], "not_an_object", 2, ["JSON object", "array"]),
    "unrecognized_format": (
        [{"body": "hi"}],
        "unrecognized_format",
        1,
        ["messages", "prompt", "completion", "instruction", "input", "output", "text"],
    ),
    "missing_messages": ([CHAT_LINE, {"body": "hi"}], "missing_messages", 2, ["'messages' missing"]),
    "messages_null": ([{"messages": None}], "missing_messages", 1, ["'messages' missing"]),
    "invalid_messages_empty": ([{"messages": []}], "invalid_messages", 1, ["non-empty list"]),
    "invalid_messages_type": ([{"messages": "hi"}], "invalid_messages", 1, ["non-empty list", "string"]),
    "invalid_message": ([CHAT_LINE, chat(USER, "hello")], "invalid_message", 2, ["messages[1]", "object"]),
    "unrecognized_role": (
        [chat({"role": "tool", "content": "x"}, ASSISTANT)],
        "unrecognized_role",
        1,
        ["'tool'", "'system'", "'user'", "'assistant'"],
    ),
    "missing_role": ([chat({"content": "x"}, ASSISTANT)], "unrecognized_role", 1, ["role", "'assistant'"]),
    "missing_content": ([chat({"role": "user"}, ASSISTANT)], "missing_content", 1, ["[0]", "'content'"]),
    "null_content": ([chat(USER, {"role": "assistant", "content": None})], "missing_content", 1, ["content"]),
    "invalid_content": ([chat({"role": "user", "content": 5}, ASSISTANT)], "invalid_content", 1, ["string"]),
    "invalid_content_part": (
        [chat({"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, ASSISTANT)],
        "invalid_content",
        1,
        ["'content'", "text"],
    ),
    "invalid_weight_value": (
        [chat(USER, {**ASSISTANT, "weight": 2})],
        "invalid_weight",
        1,
        ["'weight'", "0 or 1"],
    ),
    "invalid_weight_bool": ([chat(USER, {**ASSISTANT, "weight": True})], "invalid_weight", 1, ["0 or 1"]),
    "invalid_weight_role": (
        [chat({**USER, "weight": 1}, ASSISTANT)],
        "invalid_weight",
        1,
        ["weight", "only assistant"],
    ),
    "missing_assistant": (
        [CHAT_LINE, CHAT_LINE, chat({"role": "system", "content": "be nice"}, USER)],
        "missing_assistant",
        3,
        ["assistant message missing", "role 'assistant'"],
    ),
    "invalid_prompt": ([{"prompt": 1, "completion": "x"}], "invalid_prompt", 1, ["'prompt'", "string"]),
    "invalid_completion": ([PC_LINE, {"prompt": "a", "completion": []}], "invalid_completion", 2, ["string"]),
    "missing_completion": ([{"prompt": "a"}], "missing_completion", 1, ["'completion' missing"]),
    "missing_prompt": ([{"completion": "a"}], "missing_prompt", 1, ["'prompt' missing"]),
    "mixed_formats": ([CHAT_LINE, CHAT_LINE, PC_LINE], "mixed_formats", 3, ["mixed formats", "chat"]),
    "missing_instruction": ([{"output": "4"}], "invalid_instruction", 1, ["'instruction' missing"]),
    "invalid_instruction": (
        [ALPACA_LINE, {"instruction": ["Add"], "output": "4"}],
        "invalid_instruction",
        2,
        ["'instruction'", "string", "array"],
    ),
    "invalid_input": (
        [ALPACA_LINE, ALPACA_LINE, {**ALPACA_LINE, "input": 7}],
        "invalid_input",
        3,
        ["'input'", "string", "7"],
    ),
    "null_input": ([{**ALPACA_LINE, "input": None}], "invalid_input", 1, ["'input'", "null"]),
    "missing_output": ([ALPACA_LINE, {"instruction": "Say hi."}], "missing_output", 2, ["'output' missing"]),
    "invalid_output": ([{**ALPACA_LINE, "output": {"a": 1}}], "invalid_output", 1, ["'output'", "object"]),
    "invalid_text_type": ([TEXT_LINE, {"text": 3}], "invalid_text", 2, ["'text'", "string", "3"]),
    "invalid_text_empty": ([TEXT_LINE, TEXT_LINE, {"text": ""}], "invalid_text", 3, ["'text' is empty"]),
    "missing_text": ([TEXT_LINE, {"body": "hi"}], "invalid_text", 2, ["'text' missing"]),
    "mixed_alpaca_chat": ([ALPACA_LINE, CHAT_LINE], "mixed_formats", 2, ["mixed formats", "alpaca", "chat"]),
    "mixed_chat_text": ([CHAT_LINE, TEXT_LINE], "mixed_formats", 2, ["mixed formats", "text", "chat"]),
    "preference_input_not_object": (
        [{**PREFERENCE_LINE, "input": "hi"}],
        "invalid_input",
        1,
        ["'input'", "'messages'", "a string"],
    ),
    "preference_bad_prompt_role": (
        [PREFERENCE_LINE, {**PREFERENCE_LINE, "input": {"messages": [{"role": "bot", "content": "x"}]}}],
        "unrecognized_role",
        2,
        ["input.messages[0]", "'bot'"],
    ),
    "preferred_from_user": (
        [{**PREFERENCE_LINE, "preferred_output": [USER]}],
        "invalid_preferred_output",
        1,
        ["preferred_output[0]", "'assistant'"],
    ),
    "non_preferred_empty": (
        [PREFERENCE_LINE, {**PREFERENCE_LINE, "non_preferred_output": []}],
        "invalid_non_preferred_output",
        2,
        ["'non_preferred_output'", "non-empty"],
    ),
    "label_boolean": ([LABEL_LINE, {**LABEL_LINE, "label": True}], "invalid_label", 2, ["boolean"]),
    "label_empty": ([{**LABEL_LINE, "label": ""}], "invalid_label", 1, ["'label'"]),
    "label_text_missing": ([LABEL_LINE, {"label": "positive"}], "invalid_text", 2, ["'text' missing"]),
    "mixed_label_text": ([LABEL_LINE, TEXT_LINE], "mixed_formats", 2, ["classification", "text"]),
}


def test_task_formats_are_detected() -> None:
    assert validate_training_file(jsonl(PREFERENCE_LINE, PREFERENCE_LINE)).format == "preference"
    report = validate_training_file(jsonl(LABEL_LINE, {"text": "meh", "label": 3}))
    assert (report.format, report.example_count, report.ok) == ("classification", 2, True)


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_error_codes(case):
    lines, code, line, words = case
    data = jsonl(*lines)
    if code == "invalid_encoding":
        data = data.replace(b"x", b"\xff\xfe")
    error = single_error(data)
    assert (error.code, error.line) == (code, line)
    assert error.message.startswith(f"line {line}: ")
    for word in words:
        assert word in error.message


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\t\r\n\n"])
def test_empty_file(data):
    error = single_error(data)
    assert (error.code, error.line) == ("empty_file", 0)
    assert "empty" in error.message


def test_invalid_encoding_reports_each_bad_line_and_checks_the_rest():
    data = b"\n".join([jsonl(CHAT_LINE), b"\xc3(", jsonl(CHAT_LINE), b'{"messages": "\xed\xa0\x80"}'])
    report = validate_training_file(data)
    assert [(e.line, e.code) for e in report.errors] == [(2, "invalid_encoding"), (4, "invalid_encoding")]
    assert report.example_count == 2


def test_invalid_json_message_includes_the_json_error():
    error = single_error(b'{"prompt": "a", "completion": "b",}')
    assert "property name" in error.message and "column" in error.message


def test_deeply_nested_json_is_an_error_not_a_crash():
    error = single_error(b"[" * 100_000 + b"]" * 100_000)
    assert error.code == "too_deeply_nested"  # refused by the depth limit before the parser recurses


def test_overlong_integer_is_an_error_not_a_crash():
    error = single_error(b'{"prompt": "a", "completion": "b", "n": ' + b"1" * 5000 + b"}")
    assert error.code == "invalid_json" and "too many digits" in error.message


def test_chat_happy_path_with_blank_lines_parts_weights_and_extra_keys():
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    lines = [
        chat({"role": "system", "content": "be terse"}, USER, {**ASSISTANT, "weight": 0}, USER, ASSISTANT),
        "",
        {"messages": [parts, {**ASSISTANT, "weight": 1}], "tools": [], "parallel_tool_calls": False},
        "   ",
        chat(USER, {"role": "assistant", "content": ""}),
        "",
        "",
    ]
    data = b"\xef\xbb\xbf" + jsonl(*lines).replace(b"\n", b"\r\n")
    report = validate_training_file(data)
    assert report.ok, report.errors
    assert report == ValidationReport(format="chat", example_count=3, errors=[], error_count=0)
    assert load_examples(data) == [line for line in lines if not isinstance(line, str)]


def test_prompt_completion_happy_path():
    lines = [PC_LINE, "", {"prompt": "", "completion": " x\u2028y", "extra": 1}, "\n"]
    report = validate_training_file(jsonl(*lines))
    assert report.ok, report.errors
    assert (report.format, report.example_count) == ("prompt_completion", 2)
    assert load_examples(jsonl(*lines)) == [lines[0], lines[2]]


def test_alpaca_happy_path_with_and_without_input():
    lines = [
        ALPACA_LINE,
        {"instruction": "Say hi.", "output": "Hi!"},
        "",
        {"instruction": "Say hi.", "input": "", "output": "", "extra": 1},
    ]
    report = validate_training_file(jsonl(*lines))
    assert report == ValidationReport(format="alpaca", example_count=3, errors=[], error_count=0)
    assert load_examples(jsonl(*lines)) == [lines[0], lines[1], lines[3]]


def test_text_happy_path():
    lines = [TEXT_LINE, {"text": "line one\nline two \u2028", "source": "wiki"}]
    report = validate_training_file(jsonl(*lines))
    assert report == ValidationReport(format="text", example_count=2, errors=[], error_count=0)
    assert load_examples(jsonl(*lines)) == lines


TASK_SAMPLES = {
    "supervised": [CHAT_LINE, PC_LINE, ALPACA_LINE, TEXT_LINE],
    "dpo": [PREFERENCE_LINE],
    "classification": [LABEL_LINE],
}


@pytest.mark.parametrize("task", TASK_SAMPLES)
def test_each_format_trains_with_its_task_only(task: str):
    """The format a file is detected as is accepted by the task that trains on it, and by no other."""
    for line in TASK_SAMPLES[task]:
        detected = validate_training_file(jsonl(line)).format
        accepting = {name for name, formats in validation.TASK_FORMATS.items() if detected in formats}
        assert accepting == {task}, (line, detected)


def test_format_comes_from_first_valid_line():
    report = validate_training_file(jsonl({"prompt": 1, "completion": "x"}, CHAT_LINE, PC_LINE))
    assert report.format == "chat"
    assert [(e.line, e.code) for e in report.errors] == [(1, "invalid_prompt"), (3, "mixed_formats")]
    assert report.example_count == 1


def test_format_is_none_without_valid_lines():
    assert validate_training_file(b"not json").format is None


def test_max_errors_truncates_but_counts_everything():
    lines = [CHAT_LINE if n % 3 == 0 else "{" for n in range(60)]
    report = validate_training_file(jsonl(*lines), max_errors=5)
    assert report.error_count == 40
    assert [e.line for e in report.errors] == [2, 3, 5, 6, 8]
    assert report.example_count == 20 and not report.ok
    assert len(validate_training_file(jsonl(*lines)).errors) == 20


def test_load_examples_rejects_undecodable_lines():
    with pytest.raises(ValueError, match="line 1"):
        load_examples(b"\xff")


def test_module_imports_only_the_stdlib():
    tree = ast.parse(Path(validation.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= sys.stdlib_module_names | {"__future__"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", ""])
messages = st.fixed_dictionaries(
    {"role": roles, "content": st.text(max_size=5) | json_values},
    optional={"weight": st.sampled_from([0, 1, 2, True, None])},
)
example_lines = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": st.lists(messages | json_values, max_size=4)}),
    st.fixed_dictionaries({}, optional={"prompt": json_values, "completion": json_values}),
    st.fixed_dictionaries(
        {},
        optional={
            "instruction": st.text(max_size=5) | json_values,
            "input": json_values,
            "output": json_values,
        },
    ),
    st.fixed_dictionaries({"text": st.text(max_size=5) | json_values}),
).map(json.dumps)
files = st.one_of(
    st.binary(max_size=300),
    st.lists(example_lines | st.sampled_from(["", " ", "{", "\ufeff"]), max_size=8).map(
        lambda lines: "\n".join(lines).encode()
    ),
)


@settings(max_examples=200, deadline=None)
@given(data=files, max_errors=st.integers(min_value=1, max_value=5))
def test_never_raises_and_report_is_consistent(data, max_errors):
    report = validate_training_file(data, max_errors=max_errors)
    assert isinstance(report, ValidationReport)
    assert report.ok == (not report.errors)
    assert len(report.errors) == min(report.error_count, max_errors)
    assert [e.line for e in report.errors] == sorted(e.line for e in report.errors)
    assert report.format in (None, "chat", "prompt_completion", "alpaca", "text")
    assert (report.format is None) == (report.example_count == 0)
    if report.ok:
        assert len(load_examples(data)) == report.example_count > 0


# Limits: one line's length, nesting depth and array length. Each is checked before a line is parsed.


def long_text_line(length: int) -> bytes:
    """A valid text example exactly `length` bytes long."""
    head, tail = b'{"text": "', b'"}'
    return head + b"a" * (length - len(head) - len(tail)) + tail


def long_chat_line(length: int) -> bytes:
    """A valid chat example exactly `length` bytes long."""
    head = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "'
    tail = b'"}]}'
    return head + b"a" * (length - len(head) - len(tail)) + tail


def test_line_over_the_cap_is_refused_naming_the_line_and_the_cap():
    data = b"\n".join([jsonl(TEXT_LINE), long_text_line(1001), jsonl(TEXT_LINE), long_text_line(5000)])
    report = validate_training_file(data, max_line_bytes=1000)
    assert [(e.line, e.code) for e in report.errors] == [(2, "line_too_long"), (4, "line_too_long")]
    assert report.errors[0].message.startswith("line 2: 1,001 bytes long, over the 1,000-byte limit")
    assert "TUNEFORGE_MAX_LINE_KB" in report.errors[0].message
    assert report.errors[1].message.startswith("line 4: 5,000 bytes long")  # the last line, no newline
    assert report.example_count == 2  # the lines around the long ones are still checked


def test_lines_exactly_at_the_cap_pass():
    data = b"\n".join([long_text_line(1000), long_text_line(1000) + b"\r", long_text_line(999)])
    report = validate_training_file(data, max_line_bytes=1000)
    assert report.ok, report.errors
    assert report.example_count == 3
    assert validate_training_file(data + b"\n", max_line_bytes=1000).example_count == 3


def test_cap_message_names_kilobytes_and_megabytes():
    line = long_text_line((1 << 20) + 1)
    assert "over the 1 MB limit" in single_error(line).message  # the default cap
    assert "over the 64 KB limit" in validate_training_file(line, max_line_bytes=64 << 10).errors[0].message


def test_validating_from_a_file_holds_about_one_capped_line(tmp_path: Path):
    path = tmp_path / "long.jsonl"
    with path.open("wb") as out:
        out.write(jsonl(CHAT_LINE, CHAT_LINE) + b"\n")
        out.write(b'{"messages": [' + b'{"role": "user", "content": "hi"}, ' * ((8 << 20) // 35) + b"]}\n")
        out.write(jsonl(CHAT_LINE))
    tracemalloc.start()
    try:
        with path.open("rb") as stream:
            report = validate_training_file(stream, max_line_bytes=64 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(e.line, e.code) for e in report.errors] == [(3, "line_too_long")]
    assert report.example_count == 3
    assert peak < 1 << 20, f"validating an 8 MB line held {peak:,} bytes at its peak"


def nested(depth: int) -> dict:
    """A text example whose deepest value is `depth` containers down (the example itself is one)."""
    value: object = 0
    for level in range(depth - 1):
        value = [value] if level % 2 else {"k": value}
    return {"text": "x", "extra": value}


def test_nesting_up_to_the_limit_passes_and_one_more_is_refused():
    assert validation.MAX_DEPTH == 64
    assert validate_training_file(jsonl(nested(64), nested(64))).ok
    report = validate_training_file(jsonl(*[TEXT_LINE] * 5, nested(65), TEXT_LINE))
    assert [(e.line, e.code) for e in report.errors] == [(6, "too_deeply_nested")]
    assert report.errors[0].message == "line 6: nested more than 64 levels deep; flatten the example"
    assert report.example_count == 6


def test_brackets_and_commas_inside_strings_count_for_nothing():
    lines = [
        {"text": "[{" * 20_000 + '",\\' * 20_000},
        {"text": "x", "extra": {f"k{n}": n for n in range(20_000)}},
    ]
    report = validate_training_file(jsonl(*lines))
    assert report.ok, report.errors
    error = single_error(jsonl(TEXT_LINE, json.dumps("," * 20_000 + "[" * 100)))  # a string, not an example
    assert (error.line, error.code) == (2, "not_an_object")


def test_arrays_up_to_the_limit_pass_and_one_more_item_is_refused():
    assert validation.MAX_ARRAY_LENGTH == 10_000
    full = {"text": "x", "extra": [[0] * 10_000, {"a": [1] * 10_000}]}
    assert validate_training_file(jsonl(full)).ok
    long_messages = chat(*[USER, ASSISTANT] * 5_000, USER)
    report = validate_training_file(jsonl(CHAT_LINE, long_messages, {"text": "x", "extra": [0] * 10_001}))
    assert [(e.line, e.code) for e in report.errors] == [(2, "array_too_long"), (3, "array_too_long")]
    assert "more than 10,000 items" in report.errors[0].message


def test_load_examples_reads_a_stream_and_applies_no_cap(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([jsonl(CHAT_LINE, ""), long_text_line(2 << 20)]))
    with path.open("rb") as stream:
        examples = load_examples(stream)
    assert examples[0] == CHAT_LINE and len(examples[1]["text"]) > 2_000_000


@settings(max_examples=150, deadline=None)
@given(data=files, cap=st.integers(min_value=1, max_value=60))
def test_line_cap_matches_the_lines_of_the_file(data, cap):
    report = validate_training_file(data, max_errors=10_000, max_line_bytes=cap)
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    lengths = [len(line.removesuffix(b"\r")) for line in lines]  # a line's ending is not counted
    long_lines = [(n, length) for n, length in enumerate(lengths, start=1) if length > cap]
    reported = [e for e in report.errors if e.code == "line_too_long"]
    assert [(e.line, e.message.split(" bytes")[0]) for e in reported] == [
        (n, f"line {n}: {length:,}") for n, length in long_lines
    ]
    # Reading through a tiny buffer finds the same lines as reading the bytes.
    stream = io.BufferedReader(io.BytesIO(data), buffer_size=8)  # type: ignore[arg-type]
    assert validate_training_file(stream, max_errors=10_000, max_line_bytes=cap) == report


# The same limits through a real upload.


def post_file(base_url: str, key: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/files",
        files={"file": ("train.jsonl", data)},
        data={"purpose": "fine-tune"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def test_upload_names_a_long_line_after_many_good_ones(http: httpx.Client):
    cap = get_settings().max_line_kb << 10
    response = http.post(
        "/v1/files",
        files={"file": ("long.jsonl", chat_jsonl(1000) + long_chat_line(cap + 1) + b"\n" + chat_jsonl(2))},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("line_too_long", "file")
    assert "line 1001: " in error["message"] and "1 MB limit" in error["message"]


def test_upload_with_a_line_exactly_at_the_cap_is_accepted(http: httpx.Client):
    cap = get_settings().max_line_kb << 10
    assert upload(http, chat_jsonl(3) + long_chat_line(cap) + b"\n")["bytes"] > cap


@pytest.fixture(scope="module")
def small_line_api(database: str) -> Iterator[tuple[str, int]]:
    """An API process of its own with a 64 KB line cap; yields its URL and pid."""
    env = os.environ | {"TUNEFORGE_MAX_LINE_KB": "64"}
    with api_process(env, "api-small-line.log") as (base_url, process):
        yield base_url, process.pid


def test_a_40_mb_line_is_refused_without_the_api_holding_it(small_line_api: tuple[str, int], api_key: str):
    base_url, pid = small_line_api
    assert post_file(base_url, api_key, chat_jsonl(4)).status_code == 200  # warm: imports, pool, threads
    before = process_mb(pid, "VmHWM")
    message = b'{"role": "user", "content": "hi"}, '
    line = b'{"messages": [' + message * ((40 << 20) // len(message)) + b'{"role": "assistant"}]}'
    response = post_file(base_url, api_key, chat_jsonl(3) + line + b"\n" + chat_jsonl(1))
    grew = process_mb(pid, "VmHWM") - before
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "line_too_long"
    assert "line 4: " in error["message"] and "64 KB" in error["message"]
    assert grew < 16, f"the API's peak memory grew {grew:.0f} MB for a 40 MB line"
