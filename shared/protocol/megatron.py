"""Megatron's text generation server contract: ``PUT /api`` with its fields, defaults, messages and
response (``text``, ``segments``, ``logprobs``, ``tokens``), plus ``model`` naming a checkpoint."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, StrictInt, model_validator

from shared.protocol.limits import (MAX_PROMPTS, MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, Fraction, Name, NewTokens,
                                    Prompts, Temperature, TopK)

# Megatron's own wording for a field that fails its type or range (keyed by field, or by
# (field, pydantic error type) where one field has several)
MESSAGES = {
    "prompts": "prompts is not a list of strings",
    ("prompts", "too_short"): "prompts is empty",
    ("prompts", "too_long"): f"Maximum number of prompts is {MAX_PROMPTS}",
    "tokens_to_generate": "tokens_to_generate must be an integer greater than or equal to 0",
    "logprobs": "logprobs must be a boolean value",
    "temperature": f"temperature must be a positive number less than or equal to {MAX_TEMPERATURE}",
    "top_k": f"top_k must be an integer equal to or greater than 0 and less than or equal to {MAX_TOP_K}",
    "top_p": "top_p must be a positive float less than or equal to 1.0",
    "top_p_decay": "top_p_decay must be a positive float less than or equal to 1.0",
    "top_p_bound": "top_p_bound must be a positive float less than or equal to top_p",
    "random_seed": "random_seed must be integer",
    ("random_seed", "greater_than_equal"): "random_seed must be a positive integer",
    ("random_seed", "less_than_equal"): f"random_seed must be at most {MAX_SEED} (2^63-1)",
    "beam_width": "beam_width must be integer",
    ("beam_width", "greater_than_equal"): "beam_width must be an integer > 1",
    "stop_token": "stop_token must be an integer",
    "length_penalty": "length_penalty must be a float",
    **{f: f"{f} must be a boolean value" for f in ("add_BOS", "stop_on_eol", "stop_on_double_eol",
                                                  "prevent_newline_after_colon", "no_log")},
}


def _float(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("not a number")
    return float(v)


def _strict_float(v: Any) -> Any:
    if not isinstance(v, float):
        raise ValueError("not a float")
    return v


Num = BeforeValidator(_float)  # a number (int or float, not a bool) read as a float


class MegatronRequest(BaseModel):
    """Megatron's `PUT /api` body, plus `model` naming a checkpoint. Unknown fields are refused."""
    model_config = ConfigDict(extra="forbid")
    model: Name | None = None
    prompts: Prompts
    tokens_to_generate: Annotated[NewTokens, Strict()] = 64
    logprobs: StrictBool = False
    temperature: Annotated[Temperature, Num] = 1.0
    top_k: Annotated[TopK, Strict()] = 0
    top_p: Annotated[Fraction, Num] = 0.0
    top_p_decay: Annotated[Fraction, Num] = 0.0
    top_p_bound: Annotated[Fraction, Num] = 0.0
    add_BOS: StrictBool = False
    stop_on_eol: StrictBool = False
    stop_on_double_eol: StrictBool = False
    prevent_newline_after_colon: StrictBool = False
    random_seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="0 to 2^63-1")
    no_log: StrictBool = False
    beam_width: StrictInt | None = Field(None, ge=1)
    stop_token: StrictInt | None = Field(None, ge=0)
    length_penalty: Annotated[float, BeforeValidator(_strict_float)] = 1.0

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, body: Any) -> Any:
        if isinstance(body, dict):
            if "prompts" not in body:
                raise ValueError("prompts argument required")
            if "max_len" in body:
                raise ValueError("max_len is no longer used.  Replace with tokens_to_generate")
            if "sentences" in body:
                raise ValueError("sentences is no longer used.  Replace with prompts")
        return body

    @model_validator(mode="after")
    def _combinations(self):
        if self.tokens_to_generate == 0 and not self.logprobs:
            raise ValueError("tokens_to_generate=0 implies logprobs should be True")
        if self.top_p > 0.0 and self.top_k > 0:
            raise ValueError("cannot set both top-k and top-p samplings.")
        sent = self.model_fields_set
        for name in ("top_p_decay", "top_p_bound"):
            if name in sent and self.top_p == 0.0:
                raise ValueError(f"{name} cannot be set without top_p")
        if "top_p_bound" in sent and not 0.0 < self.top_p_bound <= self.top_p:
            raise ValueError("top_p_bound must be greater than 0 and less than top_p")
        if any(len(p) == 0 for p in self.prompts) and not self.add_BOS:
            raise ValueError("Empty prompts require add_BOS=true")
        if self.beam_width is not None and len(self.prompts) > 1:
            raise ValueError("When doing beam_search, batch size must be 1")
        return self


class MegatronResponse(BaseModel):
    text: list[str] = Field(description="prompt + generation, per prompt")
    segments: list[list[str]] = Field(description="the text of every token (prompt included)")
    logprobs: list[list[float]] | None = Field(None, description="of tokens 1..n-1 (with `logprobs: true`)")
    tokens: list[list[int]] = Field(description="token ids, prompt included")


def megatron_message(errors: list) -> str:
    from shared.protocol.errors import describe

    return describe(errors, MESSAGES)[0]
