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

A file is read one line at a time, in bounded reads, so validating it costs about one line's memory
however large the file is. A line longer than ``max_line_bytes`` is reported as ``line_too_long`` and
skipped without being held: a parsed line can cost many times its size, and the cap bounds that. A line
nested deeper than ``MAX_DEPTH`` (``too_deeply_nested``) or holding an array longer than
``MAX_ARRAY_LENGTH`` (``array_too_long``) is refused too; the check walks level by level, not recursively.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

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
# OpenAI caps an example at the model's context (~64k tokens, a few hundred KB of text); 1 MB leaves room
# for tool definitions and JSON escapes. The API passes TUNEFORGE_MAX_LINE_KB.
MAX_LINE_BYTES = 1 << 20
# A chat example nests 4 levels (tool schemas a dozen or so); no real example needs more than this.
MAX_DEPTH = 64
MAX_ARRAY_LENGTH = 10_000
_SKIP_CHUNK = 1 << 16
_BOM = b"\xef\xbb\xbf"
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


def validate_training_file(
    data: bytes | BinaryIO,
    *,
    max_errors: int = 20,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_depth: int = MAX_DEPTH,
    max_array_length: int = MAX_ARRAY_LENGTH,
) -> ValidationReport:
    """Validate a JSONL training file (bytes or a binary file), reporting at most one problem per line."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    report = ValidationReport(format=None)
    saw_line = False
    for number, raw in _lines(stream, max_line_bytes):
        try:
            if isinstance(raw, int):
                saw_line = True
                raise _Invalid(
                    "line_too_long",
                    f"{raw:,} bytes long, over the {_size(max_line_bytes)} limit for one line "
                    "(TUNEFORGE_MAX_LINE_KB); shorten or split this example",
                )
            text = _decode(raw)
            if text is not None and not text.strip():
                continue
            saw_line = True
            if text is None:
                raise _Invalid("invalid_encoding", "not valid UTF-8 text: save the file with UTF-8 encoding")
            value = _parse(text, max_depth)
            _check_shape(text, value, max_depth, max_array_length)
            line_format = _check_example(value, report.format)
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


def load_examples(data: bytes | BinaryIO) -> list[dict]:
    """Parse the examples of a file that `validate_training_file` accepted (no limits are applied)."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    examples = []
    for number, raw in _lines(stream, None):
        assert not isinstance(raw, int)  # no cap was given
        text = _decode(raw)
        if text is None:
            raise ValueError(f"line {number}: not valid UTF-8; validate the file first")
        if text.strip():
            examples.append(json.loads(text))
    return examples


def detect_format(example: dict) -> str | None:
    """The format an example's keys mark it as, or None when they match no format."""
    return next((name for name, keys in _FORMAT_KEYS if any(key in example for key in keys)), None)


def _lines(stream: BinaryIO, max_line_bytes: int | None) -> Iterator[tuple[int, bytes | int]]:
    """Yield (line number, line) for every line, or (line number, its length) for one over the cap.

    A line's length leaves out its ending (a newline, and a carriage return before it). Reads stop at the
    cap, and the rest of an over-long line is skipped in small reads, so no longer line is ever held.
    """
    # Split on bytes, not text: str.splitlines also breaks on characters like U+2028 that are legal
    # inside a JSON string.
    number = 0
    while True:
        # Room for a "\r\n" after a line at the cap, and for a BOM before the first one.
        limit = -1 if max_line_bytes is None else max_line_bytes + 2 + (len(_BOM) if number == 0 else 0)
        raw = stream.readline(limit)
        if not raw:
            return
        number += 1
        cut = len(raw) == limit and not raw.endswith(b"\n")  # stopped at the limit, mid-line
        if number == 1 and raw.startswith(_BOM):  # editors on Windows prepend one; json.loads rejects it
            raw = raw[len(_BOM) :]
        line = raw.removesuffix(b"\n")
        if cut:
            yield number, _skip_line(stream, raw)
        elif max_line_bytes is not None and len(line.removesuffix(b"\r")) > max_line_bytes:
            yield number, len(line.removesuffix(b"\r"))
        else:
            yield number, line


def _skip_line(stream: BinaryIO, start: bytes) -> int:
    """Read past the rest of a line without keeping it; the whole line's length, ending left out."""
    length, tail = len(start), start[-2:]
    while not tail.endswith(b"\n") and (chunk := stream.readline(_SKIP_CHUNK)):
        length += len(chunk)
        tail = (tail + chunk)[-2:]
    for ending in (b"\n", b"\r"):
        if tail.endswith(ending):
            length, tail = length - 1, tail[:-1]
    return length


def _decode(raw: bytes) -> str | None:
    """The line as text, or None where it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _check_shape(text: str, value: Any, max_depth: int, max_array_length: int) -> None:
    """Refuse a line nested too deeply or holding too long an array; walks level by level, not recursively."""
    # Most lines have too few brackets and commas to break either limit; only the others are walked.
    if text.count("[") + text.count("{") <= max_depth and text.count(",") < max_array_length:
        return
    level, depth = ([value] if isinstance(value, (dict, list)) else []), 1  # the containers that deep
    while level:
        if depth > max_depth:
            raise _too_deep(max_depth)
        below: list[Any] = []
        for container in level:
            if isinstance(container, list):
                if len(container) > max_array_length:
                    raise _Invalid(
                        "array_too_long",
                        f"an array has more than {max_array_length:,} items; shorten or split the example",
                    )
                below.extend(item for item in container if isinstance(item, (dict, list)))
            else:
                below.extend(item for item in container.values() if isinstance(item, (dict, list)))
        level, depth = below, depth + 1


def _too_deep(max_depth: int) -> _Invalid:
    return _Invalid("too_deeply_nested", f"nested more than {max_depth} levels deep; flatten the example")


def _record(report: ValidationReport, error: LineError, max_errors: int) -> None:
    report.error_count += 1
    if len(report.errors) < max_errors:
        report.errors.append(error)


def _parse(text: str, max_depth: int) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # the parser recurses per level; Python stops it near 1000 levels
        raise _too_deep(max_depth) from None
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


def _size(limit: int) -> str:
    for unit, name in ((1 << 20, "MB"), (1 << 10, "KB")):
        if limit % unit == 0:
            return f"{limit // unit} {name}"
    return f"{limit:,}-byte"


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
