import ast
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.files import validation
from app.files.validation import LineError, ValidationReport, load_examples, validate_training_file

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
    assert error.code == "invalid_json"


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


def test_format_constants_name_the_formats():
    assert (validation.CHAT, validation.PROMPT_COMPLETION) == ("chat", "prompt_completion")
    assert (validation.ALPACA, validation.TEXT) == ("alpaca", "text")


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
