"""Tool calling: tools go into the prompt through the model's chat template, tool calls come out parsed.

Calls use the Hermes format that Qwen 2.5, SmolLM and NousResearch's models are trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows tools (it reads the `tools` variable, as Qwen's and Llama 3's do) renders them
itself, with assistant `tool_calls` and `tool` messages as Hugging Face's chat-template convention gives
them. A template that does not (tiny-llama's plain ChatML, and many fine-tunes') gets the tools described
in the system message in that format, past calls written out as the model would write them, and tool
results as user messages in ``<tool_response>`` tags: what the model sees is what it would need to write.

`tool_choice` "required" or a named function is enforced by a grammar (constrain.py), so even a model
that was never taught tools answers with a well-formed call; "auto" lets the model choose, and "none"
leaves the tools out altogether. `ToolCallParser` splits the answer into content and calls as the text
streams, holding back only what could be the start of a call tag.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from worker.serving import constrain
from worker.serving.decode import held_back

OPEN, CLOSE = "<tool_call>", "</tool_call>"
SYSTEM_PROMPT = (
    "You may call these functions (JSON Schema):\n<tools>\n{tools}\n</tools>\nTo call one, answer "
    '<tool_call>{{"name": <name>, "arguments": <object>}}</tool_call>.'
)


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (Jinja reads it as a variable)."""
    return template is not None and "tools" in template


def function_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of a call to `tool`: its name, and arguments as its parameters describe them."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_grammar(tools: list[dict[str, Any]], *, several: bool) -> str:
    """A grammar for one call (or, with `several`, one or more) to any of `tools`, and nothing else."""
    schema = {"anyOf": [function_schema(tool) for tool in tools], "x-guidance": constrain.JSON_DEFAULTS}
    call = f'"{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"'
    start = 'call ("\\n" call)*' if several else "call"
    return constrain.lark_grammar(f"start: {start}\ncall: {call}\n")


def render(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and tools) as the chat template will read them.

    `messages` come with assistant `tool_calls` in OpenAI's shape (arguments a JSON string) and `tool`
    messages; `native` templates get Hugging Face's shape (arguments an object) and the tools themselves.
    """
    if native:
        converted = []
        for message in messages:
            if message.get("tool_calls"):
                calls = [
                    {"type": "function", "id": call.get("id"), "function": _call_object(call)}
                    for call in message["tool_calls"]
                ]
                message = message | {"tool_calls": calls}
            converted.append(message)
        return converted, tools
    plain = []
    for message in messages:
        if message.get("tool_calls"):
            written = [_written(_call_object(call)) for call in message["tool_calls"]]
            text = "\n".join(filter(None, [message.get("content") or "", *written]))
            plain.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            plain.append(
                {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
            )
        else:
            plain.append({k: v for k, v in message.items() if k in ("role", "content")})
    if tools:
        functions = (json.dumps(tool["function"], separators=(",", ":")) for tool in tools)
        described = SYSTEM_PROMPT.format(tools="\n".join(functions))
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + described}
        else:
            plain.insert(0, {"role": "system", "content": described})
    return plain, None


def _call_object(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call's function with its arguments parsed (they travel as a JSON string)."""
    function = call["function"]
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = arguments  # written back as it came: the model sees what it said
    return {"name": function["name"], "arguments": parsed}


def _written(call: dict[str, Any]) -> str:
    return f"{OPEN}\n{json.dumps(call)}\n{CLOSE}"


@dataclass(frozen=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ToolCallParser:
    """Splits an answer's text, as it streams, into content and calls to the known `names`.

    `feed` returns the content that may go out now and the calls completed by this text; a call that does
    not parse, or names an unknown function, goes out as content, as the model wrote it.
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.pending = ""  # text not yet decided: a possible call tag, or a call's body
        self.inside = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str, *, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.pending += text
        content, calls = [], []
        while True:
            if not self.inside:
                start = self.pending.find(OPEN)
                if start < 0:
                    keep = 0 if final else held_back(self.pending, [OPEN])  # a tag's start
                    content.append(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                content.append(self.pending[:start])
                self.pending, self.inside = self.pending[start:], True
            end = self.pending.find(CLOSE)
            if end < 0:
                if final:  # a call left open: try it as it stands
                    call = self._parse(self.pending[len(OPEN) :])
                    content.append("" if call else self.pending)
                    calls += [call] if call else []
                    self.pending = ""
                break
            body, whole = self.pending[len(OPEN) : end], self.pending[: end + len(CLOSE)]
            self.pending, self.inside = self.pending[end + len(CLOSE) :], False
            call = self._parse(body)
            if call is None:
                content.append(whole)
            else:
                calls.append(call)
        return "".join(content), calls

    def _parse(self, body: str) -> ToolCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("name") not in self.names:
            return None
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments already as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        call = ToolCall(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", data["name"], json.dumps(arguments))
        self.calls.append(call)
        return call
