"""OpenAI's request shapes for chat and text completions, as far as this server honours them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; default: up to the context."
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(
        None, description="Up to 4 strings that end the answer (not included)."
    )
    n: int = Field(1, description="Only 1 is supported.")
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")

    def plain_messages(self) -> list[dict[str, str]]:
        """Messages with text content only: content parts are joined, other parts refused."""
        plain = []
        for message in self.messages:
            content = message.get("content") or ""
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise ValueError("only text content parts are supported")
                content = "".join(part.get("text", "") for part in content)
            plain.append({"role": str(message.get("role", "user")), "content": str(content)})
        return plain


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
