"""Upload-time validation of fine-tuning training files (JSONL).

Checks every line of an uploaded file against the formats of the three tasks. Supervised: OpenAI's chat
(``{"messages": [...]}``) and prompt/completion (``{"prompt": "...", "completion": "..."}``), Alpaca
(``{"instruction": "...", "input": "...", "output": "..."}``) and plain text (``{"text": "..."}``).
DPO: OpenAI's preference format (``{"input": {"messages": [...]}, "preferred_output": [...],
"non_preferred_output": [...]}``). Classification: ``{"text": "...", "label": "..."}``.
A file's format is that of its first valid line. Each problem is reported with its line number and a
hint on how to fix it, so users learn about a bad file when they upload it rather than when a
training job fails. Stdlib only: it runs in the API
process, which must stay importable without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

CHAT = "chat"
PROMPT_COMPLETION = "prompt_completion"
ALPACA = "alpaca"
TEXT = "text"
PREFERENCE = "preference"
CLASSIFICATION = "classification"
# The keys that mark each format, tried in this order; a line takes the first format it matches.
_FORMAT_KEYS = (
    (CHAT, ("messages",)),
    (PREFERENCE, ("preferred_output", "non_preferred_output")),
    (PROMPT_COMPLETION, ("prompt", "completion")),
    (ALPACA, ("instruction", "output")),
    (CLASSIFICATION, ("label",)),
    (TEXT, ("text",)),
)
# Which file formats each task (`method.type`) trains on.
TASK_FORMATS = {
    "supervised": (CHAT, PROMPT_COMPLETION, ALPACA, TEXT),
    "dpo": (PREFERENCE,),
    "classification": (CLASSIFICATION,),
}
ROLES = ("system", "user", "assistant")
_ROLES_TEXT = ", ".join(repr(role) for role in ROLES)
_FORMATS_TEXT = (
    'accepted formats are chat {"messages": [{"role": "user", "content": "..."}, ...]}, '
    'prompt/completion {"prompt": "...", "completion": "..."}, '
    'Alpaca {"instruction": "...", "input": "...", "output": "..."}, text {"text": "..."}, '
    'preference {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]} '
    'and classification {"text": "...", "label": "..."}'
)


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based; 0 for problems with the whole file
    code: str
    message: str


@dataclass
class ValidationReport:
    format: str | None
    example_count: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0


class _Invalid(Exception):
    """The first problem found on a line; raised so the checks can stay flat."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def validate_training_file(data: bytes, *, max_errors: int = 20) -> ValidationReport:
    """Validate a JSONL training file, reporting at most one problem per line."""
    report = ValidationReport(format=None)
    saw_line = False
    for number, text in _lines(data):
        saw_line = True
        try:
            line_format = _check_example(_parse(text), report.format)
            if report.format is None:
                report.format = line_format
            elif line_format != report.format:
                raise _Invalid(
                    "mixed_formats",
                    f"mixed formats: this line is {line_format} but the file's first example is "
                    f"{report.format}; use one format for the whole file",
                )
            report.example_count += 1
        except _Invalid as problem:
            _record(report, LineError(number, problem.code, f"line {number}: {problem.message}"), max_errors)
    if not saw_line:
        message = "file is empty: upload a JSONL file with one training example (a JSON object) per line"
        _record(report, LineError(0, "empty_file", message), max_errors)
    return report


def load_examples(data: bytes) -> list[dict]:
    """Parse the examples of a file that `validate_training_file` accepted."""
    examples = []
    for number, text in _lines(data):
        if text is None:
            raise ValueError(f"line {number}: not valid UTF-8; validate the file first")
        examples.append(json.loads(text))
    return examples


def detect_format(example: dict) -> str | None:
    """The format an example's keys mark it as, or None when they match no format."""
    return next((name for name, keys in _FORMAT_KEYS if any(key in example for key in keys)), None)


def _lines(data: bytes) -> Iterator[tuple[int, str | None]]:
    """Yield (line number, text) for non-blank lines; text is None where the line is not UTF-8."""
    # Editors on Windows often prepend a BOM, which json.loads rejects.
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # Split the bytes rather than the text: str.splitlines also breaks on characters like
    # U+2028 that are legal inside a JSON string.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None
            continue
        if text.strip():
            yield number, text


def _record(report: ValidationReport, error: LineError, max_errors: int) -> None:
    report.error_count += 1
    if len(report.errors) < max_errors:
        report.errors.append(error)


def _parse(text: str | None) -> Any:
    if text is None:
        raise _Invalid("invalid_encoding", "not valid UTF-8 text: save the file with UTF-8 encoding")
    try:
        return json.loads(text)
    except RecursionError:
        raise _Invalid("invalid_json", "invalid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        hint = "each line must be one complete JSON object"
        raise _Invalid("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}; {hint}") from None
    except ValueError:  # Python refuses to parse integers of more than 4300 digits
        raise _Invalid("invalid_json", "invalid JSON: a number has too many digits") from None


def _check_example(value: Any, file_format: str | None) -> str:
    """Check one parsed line and return its format."""
    if not isinstance(value, dict):
        raise _Invalid("not_an_object", f"expected a JSON object, got {_type_name(value)}; {_FORMATS_TEXT}")
    # Once the file's format is known, a line with none of its keys is most likely missing one.
    line_format = detect_format(value) or file_format
    if line_format is None:
        raise _Invalid("unrecognized_format", f"unrecognized example format: {_FORMATS_TEXT}")
    _CHECKS[line_format](value)
    return line_format


def _check_chat(example: dict) -> None:
    messages = example.get("messages")
    if messages is None:
        raise _Invalid("missing_messages", "'messages' missing: each chat example needs a 'messages' list")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("invalid_messages", f"'messages' must be a non-empty list, got {_type_name(messages)}")
    for index, message in enumerate(messages):
        _check_message(f"messages[{index}]", message)
    if not any(message["role"] == "assistant" for message in messages):
        raise _Invalid(
            "missing_assistant",
            "assistant message missing: each example needs at least one message with role 'assistant'",
        )


def _check_message(where: str, message: Any) -> None:
    if not isinstance(message, dict):
        raise _Invalid(
            "invalid_message",
            f"{where} must be an object with 'role' and 'content', got {_type_name(message)}",
        )
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role[:40]) if isinstance(role, str) else _type_name(role)
        raise _Invalid(
            "unrecognized_role", f"{where} has unrecognized role {shown}: use one of {_ROLES_TEXT}"
        )
    content = message.get("content")
    if content is None:
        raise _Invalid("missing_content", f"{where} ({role}) has no 'content': give it a string")
    if not (isinstance(content, str) or _is_text_parts(content)):
        raise _Invalid(
            "invalid_content",
            f"{where} ({role}) 'content' must be a string or a non-empty list of "
            f'{{"type": "text", "text": "..."}} parts, got {_type_name(content)}',
        )
    if "weight" in message:
        if role != "assistant":
            raise _Invalid("invalid_weight", f"{where} ({role}) has a 'weight': only assistant messages may")
        weight = message["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _Invalid("invalid_weight", f"{where} 'weight' must be 0 or 1, got {_type_name(weight)}")


def _is_text_parts(content: Any) -> bool:
    return (
        isinstance(content, list)
        and bool(content)
        and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        )
    )


def _check_prompt_completion(example: dict) -> None:
    for key in ("prompt", "completion"):
        _check_string(example, key, missing_code=f"missing_{key}", kind="prompt/completion")


def _check_alpaca(example: dict) -> None:
    _check_string(example, "instruction", missing_code="invalid_instruction", kind="Alpaca")
    if "input" in example and not isinstance(example["input"], str):
        raise _Invalid(
            "invalid_input",
            f"'input' must be a string, got {_type_name(example['input'])}; "
            'use "" or leave it out when the instruction needs no input',
        )
    _check_string(example, "output", missing_code="missing_output", kind="Alpaca")


def _check_text(example: dict) -> None:
    _check_string(example, "text", missing_code="invalid_text", kind="text")
    if not example["text"]:
        raise _Invalid("invalid_text", "'text' is empty: give each text example some text to train on")


def _check_preference(example: dict) -> None:
    prompt = example.get("input")
    if not isinstance(prompt, dict) or not isinstance(prompt.get("messages"), list) or not prompt["messages"]:
        raise _Invalid(
            "invalid_input",
            f"'input' must be an object with a non-empty 'messages' list, got {_type_name(prompt)}",
        )
    for index, message in enumerate(prompt["messages"]):
        _check_message(f"input.messages[{index}]", message)
    for key in ("preferred_output", "non_preferred_output"):
        output = example.get(key)
        if not isinstance(output, list) or not output:
            raise _Invalid(
                f"invalid_{key}",
                f"'{key}' must be a non-empty list of assistant messages, got {_type_name(output)}",
            )
        for index, message in enumerate(output):
            _check_message(f"{key}[{index}]", message)
            if message["role"] != "assistant":
                raise _Invalid(f"invalid_{key}", f"{key}[{index}] must have role 'assistant'")


def _check_classification(example: dict) -> None:
    _check_text(example)
    label = example.get("label")
    if isinstance(label, bool) or not isinstance(label, str | int) or label == "":
        raise _Invalid(
            "invalid_label", f"'label' must be a non-empty string or an integer, got {_type_name(label)}"
        )


def _check_string(example: dict, key: str, *, missing_code: str, kind: str) -> None:
    value = example.get(key)
    if value is None:
        raise _Invalid(missing_code, f"'{key}' missing: each {kind} example needs a string '{key}'")
    if not isinstance(value, str):
        raise _Invalid(f"invalid_{key}", f"'{key}' must be a string, got {_type_name(value)}")


_CHECKS = {
    CHAT: _check_chat,
    PROMPT_COMPLETION: _check_prompt_completion,
    ALPACA: _check_alpaca,
    TEXT: _check_text,
    PREFERENCE: _check_preference,
    CLASSIFICATION: _check_classification,
}


def _type_name(value: Any) -> str:
    """JSON name of a value's type, for messages (never the value itself, which may be huge)."""
    if isinstance(value, list) and not value:
        return "an empty array"
    for kind, name in ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, int | float):
        return f"the number {value}" if abs(value) < 1e15 else "a number"
    return "null"
