"""Incremental detokenization with stop strings that never leak.

Text is decoded from all generated ids at once (so multi-byte characters and merges are
right), prefixed by a few prompt ids so leading spaces survive tokenizers that strip them at
the start of a decode. A stop string may end in a later token than it starts; the text that
could still be the beginning of a stop string (and a trailing incomplete UTF-8 character) is
held back until the next tokens decide.
"""

from __future__ import annotations

from typing import Sequence

_PREFIX_TOKENS = 4
_REPLACEMENT = "\ufffd"


class TextTracker:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 include_stop: bool = False, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.prefix = list(prompt_ids[-_PREFIX_TOKENS:])
        self.prefix_text = self._raw(self.prefix)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped: str | None = None  # the stop string that ended the text

    def _raw(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=self.skip)

    def decode(self, ids: Sequence[int]) -> str:
        full = self._raw(self.prefix + list(ids))
        if full.startswith(self.prefix_text):
            return full[len(self.prefix_text):]
        return self._raw(ids)

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest)
        hits = [(i, s) for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """How many trailing characters might still start a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def add(self, new_ids: Sequence[int]) -> str:
        """Feed generated ids; returns the text that is now safe to show. Check ``stopped`` after."""
        if self.stopped is not None:
            return ""
        first_new = len(self.ids)
        self.ids.extend(new_ids)
        text = self.decode(self.ids)
        hit = self._find_stop(text) if self.stop else None
        if hit is not None:
            i, s = hit
            end = i + len(s)
            self.text = text[: end if self.include_stop else i]
            self.stopped = s
            # keep the ids up to the one that completed the stop string
            for n in range(first_new + 1, len(self.ids) + 1):
                if len(self.decode(self.ids[:n])) >= end:
                    del self.ids[n:]
                    break
            return self._emit(len(self.text))
        self.text = text
        safe = len(text.rstrip(_REPLACEMENT)) if text.endswith(_REPLACEMENT) else len(text)
        safe -= self._held(text[:safe]) if self.stop else 0
        return self._emit(safe)

    def finish(self) -> str:
        """The generation ended without a stop string: release what was held back."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
