"""`tuneforge chat`: talk to a base or fine-tuned model through the API, the answer streamed as it is
written; with no prompt, a conversation read line by line (history kept) until an empty line or EOF."""

import json
import sys
from typing import Annotated

import typer
from httpx_sse import EventSource

from app.cli.client import OPTIONS, Client, CliError, say


def _ask(client: Client, body: dict) -> str:
    """Stream one answer to stdout (or, with --json, print the whole one); returns its text."""
    if OPTIONS.json:
        answer = client.post("/v1/chat/completions", json=body | {"stream": False})
        print(json.dumps(answer, indent=2))
        return answer["choices"][0]["message"]["content"] or ""
    parts = []
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        for sse in EventSource(response).iter_sse():
            if sse.data == "[DONE]":
                break
            chunk = json.loads(sse.data)
            if "error" in chunk:  # an error after the stream began comes as an event of its own
                raise CliError(str(chunk["error"].get("message", chunk["error"])))
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
    print()
    return "".join(parts)


def chat(
    model: str,
    prompt: Annotated[str | None, typer.Argument(help="One question; without it, a conversation.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message first.")] = None,
    max_tokens: Annotated[int, typer.Option(help="The longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 answers greedily.")] = 0.7,
) -> None:
    """Chat with MODEL (a base model or ft:...): one PROMPT, or a conversation when none is given."""
    messages = [{"role": "system", "content": system}] if system else []
    settings = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    with Client(timeout=600) as client:
        if prompt is not None:
            _ask(client, settings | {"messages": [*messages, {"role": "user", "content": prompt}]})
            return
        interactive = sys.stdin.isatty()
        if interactive:
            say(f"chatting with {model}; an empty line or Ctrl-D ends it")
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            answer = _ask(client, settings | {"messages": messages})
            messages.append({"role": "assistant", "content": answer})
