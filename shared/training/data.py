"""Finetuning data: JSONL records -> tokens with a loss mask -> packed fixed-length sequences.

A record is ``{"text"}`` (every token is a target), ``{"prompt", "completion"}`` (targets: the
completion and EOS) or ``{"messages"}`` (rendered with the tokenizer's chat template; targets:
the assistant turns). Samples are shuffled by seed, then packed whole (next-fit) into rows of
``seq_length + 1`` tokens; a row's inputs are ``row[:-1]`` and its labels ``row[1:]``. Packed
documents attend to earlier ones in the row (Megatron's default, no attention reset); the first
token of every sample is never a target.

Batch ``i`` holds the sequences ``[i*G, (i+1)*G)`` of an endless stream of epochs, each a
permutation of the rows drawn from the seed, so the data position is the iteration number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch

from shared.specs.records import ROLES, DataError, check_record, read_jsonl  # noqa: F401 - re-exported

@dataclass
class Sample:
    ids: list[int]
    mask: list[int]  # 1 where the token is a loss target


@dataclass
class PackedData:
    tokens: torch.Tensor                       # (N, S+1) int64
    mask: torch.Tensor                         # (N, S+1) bool, target flags aligned with tokens
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(self.tokens.numpy().tobytes())
        h.update(self.mask.numpy().tobytes())
        return h.hexdigest()

    def fingerprint(self) -> str:
        return self._digest

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (n, S+1), label mask (n, S) float) of the rows ``index``."""
        return self.tokens[index], self.mask[index, 1:].float()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, seed: int, iteration: int, global_batch: int) -> torch.Tensor:
    """Row indices of training batch ``iteration`` (0-based) in the seeded epoch stream."""
    out, cache = [], {}
    for k in range(iteration * global_batch, (iteration + 1) * global_batch):
        epoch, pos = divmod(k, n)
        if epoch not in cache:
            cache[epoch] = epoch_order(n, seed, epoch)
        out.append(int(cache[epoch][pos]))
    return torch.tensor(out, dtype=torch.long)


# ---- reading ------------------------------------------------------------------------------

def _encode(tok, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _eos(tok) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def _chat(tok, messages: list[dict], where: str) -> Sample:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not getattr(tok, "chat_template", None):
        raise DataError(f"{where}: \"messages\" needs a tokenizer with a chat template and this one has none; "
                        "use {\"prompt\", \"completion\"} records instead")

    def render(msgs, gen):
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # template errors (raise_exception in jinja) surface as many types
            raise DataError(f"{where}: the chat template rejected the conversation: {e}") from None

    full = render(messages, False)
    cuts: list[tuple[int, int]] = []  # (start, end) character spans of assistant turns
    for k in turns:
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the tokenizer's chat template does not render conversations "
                            "incrementally, so assistant turns cannot be located; use prompt/completion records")
        cuts.append((len(before), len(through)))
    ids, mask, pos = [], [], 0
    for start, end in cuts + [(len(full), len(full))]:
        for text, target in ((full[pos:start], 0), (full[start:end], 1)):
            if text:
                piece = _encode(tok, text, special=False)
                ids += piece
                mask += [target] * len(piece)
        pos = end
    return Sample(ids, mask)


def tokenize_record(tok, rec: dict[str, Any], where: str) -> Sample:
    kind = check_record(rec, where)
    if kind == "messages":
        return _chat(tok, rec["messages"], where)
    if kind == "prompt":
        prompt = _encode(tok, rec["prompt"], special=True)
        completion = _encode(tok, rec["completion"], special=False) + _eos(tok)
        return Sample(prompt + completion, [0] * len(prompt) + [1] * len(completion))
    ids = _encode(tok, rec["text"], special=True) + _eos(tok)
    return Sample(ids, [1] * len(ids))


def load_samples(paths: Sequence[str | Path], tok) -> list[Sample]:
    samples = []
    for path in paths:
        for no, rec in read_jsonl(path):
            s = tokenize_record(tok, rec, f"{path}:{no}")
            s.mask[0] = 0  # the first token of a sample is never predicted from the previous one
            samples.append(s)
        if not samples:
            raise DataError(f"{path} holds no records")
    return samples


# ---- packing ------------------------------------------------------------------------------

def fit_length(samples: list[Sample], seq_length: int, overlong: str) -> tuple[list[Sample], dict[str, int]]:
    """Truncate or drop samples longer than a row; drop samples left without targets."""
    limit = seq_length + 1
    kept, truncated, dropped = [], 0, 0
    for s in samples:
        if len(s.ids) > limit:
            if overlong == "drop":
                dropped += 1
                continue
            s = Sample(s.ids[:limit], s.mask[:limit])
            truncated += 1
        if not any(s.mask):
            dropped += 1  # e.g. a prompt that fills the whole row
            continue
        kept.append(s)
    return kept, {"truncated": truncated, "dropped": dropped}


def pack(samples: Sequence[Sample], seq_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-fit packing of whole samples into rows of ``seq_length + 1`` tokens (padding: no target)."""
    limit = seq_length + 1
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    mask: list[int] = []
    for s in samples:
        if len(ids) + len(s.ids) > limit:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + s.ids, mask + s.mask
    if ids:
        rows.append((ids, mask))
    tokens = torch.full((len(rows), limit), pad_id, dtype=torch.long)
    flags = torch.zeros((len(rows), limit), dtype=torch.bool)
    for r, (i, m) in enumerate(rows):
        tokens[r, : len(i)] = torch.tensor(i, dtype=torch.long)
        flags[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return tokens, flags


def _shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return [samples[i] for i in order]


def build_datasets(tok, data_path: Sequence[str], seq_length: int, seed: int, *, valid_path: Sequence[str] = (),
                   valid_fraction: float = 0.0, overlong: str = "truncate",
                   vocab_size: int | None = None) -> tuple[PackedData, PackedData | None]:
    """Training rows and validation rows (held-out files, else a seeded fraction of the samples)."""
    samples = _shuffled(load_samples(data_path, tok), seed)
    valid: list[Sample] = []
    if valid_path:
        valid = load_samples(valid_path, tok)
    elif valid_fraction > 0 and len(samples) > 1:
        k = min(max(1, round(valid_fraction * len(samples))), len(samples) - 1)
        valid, samples = samples[:k], samples[k:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out = []
    for name, group in (("train", samples), ("valid", valid)):
        if not group:
            out.append(None)
            continue
        kept, counts = fit_length(group, seq_length, overlong)
        if not kept:
            raise DataError(f"no {name} sample has a target token within --seq-length {seq_length} "
                            f"({counts['dropped']} dropped); raise --seq-length or shorten the prompts")
        tokens, mask = pack(kept, seq_length, pad)
        if vocab_size is not None and int(tokens.max()) >= vocab_size:
            raise DataError(f"the tokenizer produced id {int(tokens.max())} but the model's vocabulary has "
                            f"{vocab_size} entries; the checkpoint and its tokenizer do not match")
        out.append(PackedData(tokens, mask, {"samples": len(kept), "rows": len(tokens),
                                             "target_tokens": int(mask.sum()), **counts}))
    return out[0], out[1]
