"""How a rank runs its decode steps (``DecodePlan``), and the state the GPU plan keeps on the device.

On CUDA every part of the plan is on: the layers' elementwise work fused by ``torch.compile``
(``shared.model.ops``), the step replayed as CUDA graphs captured at load for every bucket
(``cuda_graphs``, every pipeline stage), the step's inputs, positions and sampling settings
kept on the device and sampled there in one batch (``sampling.sample_batch``), so a step's
only host round trip is the copy of its new token ids; and the prompts admitted together
are prefilled together. On CPU the plan is today's: per-row sampling and the native or
torch kernels. Tests switch parts on on CPU, where inductor compiles too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.inference.sampling import BatchParams


@dataclass(frozen=True)
class DecodePlan:
    compiled: bool = False          # fused elementwise ops (torch.compile)
    graphs: bool = False            # CUDA graphs of the decode step (needs device_steps; CUDA only)
    device_steps: bool = False      # step state and sampling on the device, one token copy per step
    batched_prefill: bool = False   # prompts admitted together are prefilled together

    def __post_init__(self) -> None:
        if self.graphs and not self.device_steps:
            raise ValueError("CUDA graphs replay the device-side step: graphs=True needs device_steps=True")

    @classmethod
    def for_device(cls, device_type: str, cuda_graphs: bool = True) -> "DecodePlan":
        gpu = device_type == "cuda"
        return cls(compiled=gpu, graphs=gpu and cuda_graphs, device_steps=gpu, batched_prefill=gpu)


class DeviceRows:
    """The device-side step state: next input id and position of every cache row (0 and 0 for
    rows no sequence decodes in), and the live rows' sampling settings. Rebuilt from the host's
    slots when the live rows change; advanced on the device after every step."""

    def __init__(self, max_batch: int, device: torch.device, vocab: int):
        self.device, self.vocab = device, vocab
        self.ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.live: tuple[int, ...] = ()
        self.index: torch.Tensor | None = None
        self.params: BatchParams | None = None
        self._ones = torch.ones(max_batch, 1, dtype=torch.long, device=device)

    def _put(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t.to(self.device)

    def load(self, live: tuple[int, ...], slots) -> None:
        """``slots``: the live rows' host state (``spec``, ``last``, ``pos``, ``count``, ``top_p``,
        ``generated``)."""
        ids = torch.zeros(self.ids.shape, dtype=torch.long)
        pos = torch.zeros(self.pos.shape, dtype=torch.long)
        for row, slot in zip(live, slots):
            ids[row, 0], pos[row, 0] = slot.last, slot.pos
        self.ids.copy_(self._put(ids), non_blocking=True)
        self.pos.copy_(self._put(pos), non_blocking=True)
        self.index = self._put(torch.tensor(live, dtype=torch.long))
        self.params = BatchParams.build([(s.spec, s.count, s.top_p, s.generated) for s in slots], self.device,
                                        self.vocab)
        self.live = live

    def last_tokens(self) -> torch.Tensor:
        return self.ids.index_select(0, self.index).squeeze(-1)

    def advance(self, tokens: torch.Tensor) -> None:
        self.ids.index_copy_(0, self.index, tokens.unsqueeze(-1))
        self.pos.index_add_(0, self.index, self._ones[: len(self.live)])
        self.params.advance(tokens)


def to_host(tokens: torch.Tensor, logprobs: torch.Tensor | None) -> tuple[list[int], list[float] | None]:
    """The step's one device-to-host copy: token ids (and their log-probabilities) together."""
    if logprobs is None:
        return tokens.cpu().tolist(), None
    both = torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64)]).cpu()
    return [int(t) for t in both[0].tolist()], both[1].tolist()
