"""The wire, declared once: Megatron ``PUT /api``, OpenAI completions and chat, models, errors and
the relay messages between the gateway and the generate workers.

Torch-free: the gateway, the standalone server and the runtime all validate with these models,
so a limit or a default has one definition.
"""

from shared.protocol.errors import RequestError, megatron_error, openai_error, parse
from shared.protocol.limits import MAX_LOGPROBS, MAX_N, MAX_PROMPTS, MAX_SEED, MAX_STOP

__all__ = ["MAX_LOGPROBS", "MAX_N", "MAX_PROMPTS", "MAX_SEED", "MAX_STOP", "RequestError", "megatron_error",
           "openai_error", "parse"]
