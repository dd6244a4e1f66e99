"""OpenAI's completions and chat: requests (with the vLLM extras clients send), responses, stream
chunks and models. What the servers do not implement is declared too, and refused by name."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.protocol.errors import FieldError
from shared.protocol.limits import MAX_LOGPROBS, MAX_N, MAX_PROMPTS, MAX_STOP, Name, Seed, TokenId

StopStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
               Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Request(BaseModel):
    """Sampling fields common to completions and chat."""
    model_config = ConfigDict(extra="forbid")
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    model: Name | None = None
    max_tokens: int | None = Field(None, ge=0, description="new tokens (completions default 16; chat: as many "
                                                           "as fit)")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1; 0 is greedy")
    top_p: float | None = Field(None, ge=0, le=1, description="default 1 (no nucleus filter); 0 is greedy")
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="-1 or 0: no top-k filter; 1: greedy")
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="HF's: >1 discourages any seen token")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit")
    user: str | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # declared so that they are refused by name, not silently ignored
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                     "response_format", *self.UNSUPPORTED):
            if getattr(self, name) not in (None, [], {}):
                raise FieldError(name, f"`{name}` is not supported by this server; remove it")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "`best_of` is not supported by this server (only best_of = n)")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "`stream_options` is only allowed with `stream: true`")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise FieldError("min_tokens", "min_tokens must be at most max_tokens")
        return self

    @property
    def tokens_field(self) -> str:
        """The field that set the new-token budget (an error's ``param``)."""
        return "max_tokens"

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("suffix",)
    prompt: Prompt = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per position")
    suffix: str | None = None

    PROMPT_FIELD: ClassVar[str] = "prompt"

    def new_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def prompt_list(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        c = self.content
        return "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "`top_logprobs` needs `logprobs: true`")
        return self

    PROMPT_FIELD: ClassVar[str] = "messages"

    def new_tokens(self) -> int | None:
        """The new-token budget, or None: as many as fit."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


# ---- responses ------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatChunk(BaseModel):
    """One `chat.completion.chunk` of a stream (`choices` is empty in the final usage chunk)."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(CompletionResponse):
    """One `text_completion` chunk of a stream (`choices` is empty in the final usage chunk)."""


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
