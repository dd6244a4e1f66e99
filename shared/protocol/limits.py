"""Limits and common field types shared by every generation API."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_PROMPTS = 128       # prompts per request (Megatron's limit)
MAX_N = 16              # choices per prompt
MAX_SEED = 2**63 - 1    # per-sequence seeds (seed + i) stay within a generator's 64-bit range
MAX_LOGPROBS = 20       # alternatives per position (completions `logprobs`, chat `top_logprobs`)
MAX_STOP = 16           # stop strings per request
MAX_TEMPERATURE = 100.0 # Megatron's sampling limits (PUT /api and generate jobs)
MAX_TOP_K = 1000


def _no_dotdot(name: str) -> str:
    if ".." in name:
        raise ValueError("a name cannot contain '..'")
    return name


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$", description="checkpoint name "
                            "(no '..')"), AfterValidator(_no_dotdot)]
Prompts = Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
NewTokens = Annotated[int, Field(ge=0)]
Temperature = Annotated[float, Field(gt=0, le=MAX_TEMPERATURE)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="0 to 2^63-1")]
TokenId = Annotated[int, Field(ge=0)]
