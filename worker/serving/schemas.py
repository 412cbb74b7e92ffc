"""OpenAI's request shapes for chat and text completions: what this server honours, and what it refuses.

Every field of OpenAI's two requests is declared, so a field OpenAI does not have is a 400 naming it
(`extra="forbid"`), and `null` means "the default" wherever OpenAI's spec allows it. A field this server
does not implement (audio, `echo`, `best_of`, ...) is accepted at its default value and otherwise
refused by `check_supported`, naming it: asking for something and silently not getting it is worse than
an error. Bounds are OpenAI's: a value outside them is a 400 naming the field, never a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)

from app.errors import ApiError
from worker.serving import constrain
from worker.serving import tools as tools_module

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_PROMPTS = 128
"""Most prompts in one text completion request (OpenAI's upper bound for `n`), one batch row each."""
DEFAULT_MAX_TOKENS = 16
"""A text completion's token limit when the request sets none (OpenAI's default)."""
TokenId = Annotated[int, Field(ge=0)]


def one_of(description: str) -> WrapValidator:
    """A union field's failure as one error naming the field, rather than one per member of the union."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {description}") from None

    return WrapValidator(validate)


def unsupported(param: str, message: str | None = None) -> ApiError:
    """The 400 for a field Tuneforge does not implement yet (or not with the value asked)."""
    return ApiError(
        400,
        message
        or f"'{param}' is not supported by Tuneforge's inference server yet (only its default is); "
        "leave it out and retry.",
        param=param,
        code="unsupported_parameter",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted: these streams carry no obfuscation padding


class _Sampling(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; at most the model's context, prompt included."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; null means 1.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus mass; 0 keeps the likeliest token.")
    n: int | None = Field(None, ge=1, le=128, description="Choices per prompt, each sampled on its own.")
    stop: Annotated[str | list[str] | None, one_of("a string or a list of at most 4 strings")] = Field(
        None, description="Up to 4 strings that end the answer (not included)."
    )
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Makes sampling reproducible.")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> a bias from -100 to 100 added to its logit."
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted once from the logit of every token generated so far."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from each token's logit once per time it was generated."
    )

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("must be a string or a list of at most 4 strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids, and {token!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be from -100 to 100, and token {token}'s is {bias}")
        return value

    def asks_unsupported(self) -> dict[str, bool]:
        """Each unimplemented field: whether this request asks for something with it."""
        return {}

    def check_supported(self) -> None:
        """Raise the 400 for the first field asking for what this server does not implement."""
        for param, asks in self.asks_unsupported().items():
            if asks:
                raise unsupported(param)

    @property
    def sampling(self) -> dict[str, Any]:
        """GenerationRequest's sampling settings, OpenAI's defaults in place of nulls."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "stop": self.stop_list(),
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": {int(token): bias for token, bias in (self.logit_bias or {}).items()},
        }

    @property
    def choices(self) -> int:
        return self.n or 1

    def seed_of(self, choice: int) -> int | None:
        """Choice `choice`'s seed: each of `n` choices samples on its own, all reproducible from one seed."""
        return None if self.seed is None else self.seed + choice

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CalledFunction(BaseModel):
    name: str
    arguments: str  # a JSON object, as the model wrote it


class AssistantToolCall(BaseModel):
    """A call an assistant message made, as the SDK returned it."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """A message of the chat; an assistant message the SDK returned can be sent back as it is."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["developer", "system", "user", "assistant", "tool", "function"]
    content: Annotated[str | list[dict[str, Any]] | None, one_of("a string or a list of content parts")] = (
        None
    )
    name: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def grammar(self) -> str | None:
        """The grammar the answer must follow, or None for free text; a 400 if it cannot be enforced."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return constrain.json_schema_grammar({"type": "object"})
        if self.json_schema is None:
            raise ApiError(
                400,
                "response_format of type 'json_schema' needs its 'json_schema': {name, schema, strict}.",
                param="response_format.json_schema",
                code="invalid_value",
            )
        try:
            return constrain.json_schema_grammar(self.json_schema.schema_)
        except ValueError as exc:
            raise ApiError(
                400,
                f"The JSON schema in response_format cannot be enforced: {exc}",
                param="response_format.json_schema.schema",
                code="invalid_json_schema",
            ) from None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | NamedToolChoice | None,
        one_of("'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"),
    ] = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(
                400,
                "'top_logprobs' asks for alternatives of each token's log-probability: set 'logprobs' to "
                "true as well.",
                param="top_logprobs",
                code="invalid_value",
            )

    @property
    def logprobs_asked(self) -> int | None:
        """None without logprobs; else how many alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def asks_unsupported(self) -> dict[str, bool]:
        return super().asks_unsupported() | {
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none"),
            "audio": self.audio is not None,
            "modalities": self.modalities not in (None, ["text"]),
            "prediction": self.prediction is not None,
            "reasoning_effort": self.reasoning_effort is not None,
            "verbosity": self.verbosity is not None,
            "web_search_options": self.web_search_options is not None,
            "store": bool(self.store),  # stored completions cannot be listed or retrieved here
        }

    @property
    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools the model is told about (none with tool_choice 'none'), as JSON objects."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def tool_grammar(self) -> str | None:
        """The grammar that forces a call, for tool_choice 'required' or a named function; else None."""
        choice, tools = self.tool_choice, self.tool_dicts or []
        if choice in (None, "auto", "none"):
            return None
        if not tools:
            raise ApiError(
                400, "'tool_choice' asks for a tool call, but 'tools' names none.", param="tool_choice"
            )
        if isinstance(choice, NamedToolChoice):
            tools = [tool for tool in tools if tool["function"]["name"] == choice.function.name]
            if not tools:
                raise ApiError(
                    400,
                    f"'tool_choice' names function '{choice.function.name}', which is not in 'tools'.",
                    param="tool_choice",
                    code="invalid_value",
                )
        several = choice == "required" and self.parallel_tool_calls is not False
        try:
            return tools_module.call_grammar(tools, several=several)
        except ValueError as exc:
            raise ApiError(
                400, f"The tools' parameters cannot be enforced: {exc}", param="tools", code="invalid_value"
            ) from None

    @property
    def token_limit(self) -> tuple[str, int | None]:
        """The token limit asked for, and the field that asked (the newer name wins when both are set)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def plain_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template reads them: text content only, `developer` as `system`; assistant
        tool calls and tool results kept (tools.render shapes them for the template)."""
        plain = []
        for i, message in enumerate(self.messages):
            where = f"messages.{i}"  # as FastAPI's validation errors name it
            if message.role == "function":
                raise unsupported(
                    f"{where}.role",
                    f"{where} is a 'function' message, OpenAI's deprecated form: send 'tool' messages.",
                )
            if message.role == "tool" and not message.tool_call_id:
                raise ApiError(
                    400,
                    f"{where} is a tool message without the 'tool_call_id' of the call it answers.",
                    param=f"{where}.tool_call_id",
                    code="invalid_value",
                )
            if message.tool_calls and message.role != "assistant":
                raise ApiError(
                    400,
                    f"{where} ({message.role}) has tool_calls; only assistant messages make calls.",
                    param=f"{where}.tool_calls",
                    code="invalid_value",
                )
            for field in ("function_call", "audio"):
                if getattr(message, field):
                    raise unsupported(f"{where}.{field}")
            content = message.content
            if content is None and message.role != "assistant":
                raise ApiError(
                    400,
                    f"{where} ({message.role}) has no content.",
                    param=f"{where}.content",
                    code="invalid_value",
                )
            if isinstance(content, list):
                texts = [part.get("text") for part in content if part.get("type") == "text"]
                if len(texts) != len(content) or not all(isinstance(text, str) for text in texts):
                    raise unsupported(
                        f"{where}.content", f"Only text content parts are supported yet ({where})."
                    )
                content = "".join(str(text) for text in texts)
            role = "system" if message.role == "developer" else message.role
            entry: dict[str, Any] = {"role": role, "content": content or ""}
            if message.tool_calls:
                entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
            if message.tool_call_id:
                entry["tool_call_id"] = message.tool_call_id
            plain.append(entry)
        return plain


class CompletionRequest(_Sampling):
    prompt: Annotated[
        str | list[str] | list[TokenId] | list[list[TokenId]],
        one_of("a string, a list of strings, a list of token ids (integers from 0), or a list of such lists"),
    ] = Field(
        description="A text, a list of texts, a list of token ids, or a list of such lists: one choice each."
    )
    max_tokens: int | None = Field(
        None, ge=1, description=f"Most tokens to generate; null means {DEFAULT_MAX_TOKENS}, or what fits."
    )
    echo: bool | None = None
    best_of: int | None = Field(None, ge=0, le=20)
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None

    def asks_unsupported(self) -> dict[str, bool]:
        return super().asks_unsupported() | {
            "echo": bool(self.echo),
            "best_of": (self.best_of or 1) > 1,
            "suffix": self.suffix is not None,
        }

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or token ids: OpenAI answers one choice per prompt, in this order."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "'prompt' is an empty list.", param="prompt", code="invalid_value")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(
                400,
                f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} fit one request.",
                param="prompt",
                code="invalid_value",
            )
        return list(prompt)  # type: ignore[arg-type]
