"""The inference engine: batched TP/PP generation with a KV cache and continuous batching.

``Engine`` loads a checkpoint once on every rank; ``Scheduler`` batches sequences from many
threads onto it; ``TextTracker`` turns ids into text with stop strings.
"""

from shared.inference.engine import Engine, EngineInfo, LengthError
from shared.inference.scheduler import (Delta, GenerationFailed, Overloaded, Scheduler, SeqRequest, SeqResult,
                                        Sequence)
from shared.inference.stop import TextTracker

__all__ = ["Delta", "Engine", "EngineInfo", "GenerationFailed", "LengthError", "Overloaded",
           "Scheduler", "SeqRequest", "SeqResult", "Sequence", "TextTracker"]
