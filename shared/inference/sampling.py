"""Token selection on the last pipeline stage: greedy, temperature, top-k, top-p, min-p.

Filtering follows Megatron's ``sample``: temperature first, then top-k or top-p (nucleus:
the smallest prefix of the sorted distribution whose mass exceeds ``top_p``; the most likely
token is always kept). ``filter_batch`` does it for a batch of rows, each with its own
settings, as tensor operations on the logits' device; a single row is the batch of one.

Draws: on the CPU every sampled row draws from its own ``torch.Generator`` (``sample_row``).
On the GPU a whole batch is drawn at once, with no host round trip (``sample_batch``): the
Gumbel-max trick over counter-based noise, a hash of (the row's seed, its token count, the
vocabulary index), so a row's tokens still depend only on its seed and its logits, never on
its batch neighbours or on which rows were live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def filter_batch(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, max_k: int, use_top_p: bool = True, use_min_p: bool = True) -> torch.Tensor:
    """Rows (n, V) of fp32 logits -> filtered, temperature-scaled logits (-inf where removed).

    ``temperature``, ``top_p``, ``min_p`` (n,) float, ``top_k`` (n,) int (0: no top-k; top_p
    outside (0, 1): no top-p; min_p 0: none). ``max_k`` is the largest top_k of the rows (0:
    none), and the ``use_*`` flags skip a filter no row uses: the caller knows its rows'
    settings, so nothing here waits for the device.
    """
    x = x / temperature.to(x.dtype).unsqueeze(-1)
    ninf = float("-inf")
    if max_k > 0:
        k = top_k.clamp(0, x.shape[-1])
        top = torch.topk(x, min(max_k, x.shape[-1]), dim=-1).values
        kth = top.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))
        kth = torch.where((k > 0).unsqueeze(-1), kth, torch.full_like(kth, ninf))
        x = x.masked_fill(x < kth, ninf)
    if use_top_p:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        p = top_p.to(cum.dtype).unsqueeze(-1)
        drop = cum > p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
        drop[..., 0] = False
        drop &= (p > 0) & (p < 1)
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), ninf)
    if use_min_p:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p.to(probs.dtype).unsqueeze(-1) * probs.max(-1, keepdim=True).values, ninf)
    return x


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  min_p: float = 0.0) -> torch.Tensor:
    """One row (V,) of fp32 logits -> filtered, temperature-scaled logits (-inf where removed)."""
    one = lambda v, dt: torch.tensor([v], dtype=dt, device=logits.device)  # noqa: E731
    return filter_batch(logits.unsqueeze(0), one(temperature, torch.float64), one(top_k, torch.long),
                        one(top_p, torch.float64), one(min_p, torch.float64), max_k=max(top_k, 0),
                        use_top_p=0.0 < top_p < 1.0, use_min_p=min_p > 0.0)[0]


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
               generator: torch.Generator) -> int:
    x = filter_logits(logits.float(), temperature, top_k, top_p, min_p)
    probs = x.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 32-bit values held in int64 (products stay below 2**63)."""
    for mult in (0x7FEB352D, 0x5BD1E995, 0x7FEB352D):
        x = x ^ (x >> 15)
        x = (x * mult) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, vocab) float32 in (0, 1), a pure function of each row's (seed, step) and the column."""
    seed = seed.to(torch.long)
    h = _mix32(_mix32(_mix32(seed & _M32) ^ ((seed >> 32) & _M32)) ^ (step.to(torch.long) & _M32))
    cols = (torch.arange(vocab, device=seed.device, dtype=torch.long) * 0x9E3779B1) & _M32
    bits = _mix32(_mix32(h.unsqueeze(-1) ^ cols) ^ 0x5851F42D)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class BatchParams:
    """The sampling settings of the rows of a decode batch, as tensors on the device.

    ``stop`` / ``colon`` / ``newline``: (n, k) token ids padded with -1 (stop ids banned
    before ``min_tokens``; newline ids banned after a token in ``colon``). With any penalized
    row, ``counts`` (n, V) counts each row's generated tokens and ``seen`` (n, V) marks its
    prompt and generated tokens, both advanced on the device.
    """

    greedy: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    top_p_decay: torch.Tensor
    top_p_bound: torch.Tensor
    min_p: torch.Tensor
    seed: torch.Tensor
    count: torch.Tensor
    min_tokens: torch.Tensor
    stop: torch.Tensor
    colon: torch.Tensor
    newline: torch.Tensor
    max_k: int
    use_top_p: bool
    use_min_p: bool
    any_sampled: bool
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None
    bias_vals: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    seen: torch.Tensor | None = None

    @classmethod
    def build(cls, rows, device: torch.device, vocab: int) -> "BatchParams":
        """``rows``: (spec, tokens generated so far, current top_p, generated ids) per batch row;
        ``spec`` has the fields of ``SamplingParams``. One host-to-device copy per tensor, made
        when the rows change."""
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True) \
                if device.type == "cuda" else torch.tensor(values, dtype=dtype, device=device)

        def padded(lists):
            width = max((len(v) for v in lists), default=0)
            return col([list(v) + [-1] * (width - len(v)) for v in lists] if width else [[] for _ in lists],
                       torch.long).reshape(len(lists), width)

        specs = [r[0] for r in rows]
        greedy = [bool(s.greedy) for s in specs]
        params = cls(
            greedy=col(greedy, torch.bool), temperature=col([1.0 if g else s.temperature for g, s in zip(greedy, specs)],
                                                            torch.float64),
            top_k=col([s.top_k for s in specs], torch.long), top_p=col([r[2] for r in rows], torch.float64),
            top_p_decay=col([s.top_p_decay for s in specs], torch.float64),
            top_p_bound=col([s.top_p_bound for s in specs], torch.float64),
            min_p=col([s.min_p for s in specs], torch.float64), seed=col([s.seed for s in specs], torch.long),
            count=col([r[1] for r in rows], torch.long), min_tokens=col([s.min_tokens for s in specs], torch.long),
            stop=padded([s.stop_ids for s in specs]), colon=padded([s.colon_ids for s in specs]),
            newline=padded([s.newline_ids for s in specs]),
            max_k=max([s.top_k for g, s in zip(greedy, specs) if not g] + [0]),
            use_top_p=any(0.0 < r[2] < 1.0 or (r[2] > 0 and r[0].top_p_decay > 0) for g, r in zip(greedy, rows) if not g),
            use_min_p=any(s.min_p > 0 for g, s in zip(greedy, specs) if not g), any_sampled=not all(greedy))
        if any(s.penalized for s in specs):
            params.presence = col([s.presence_penalty for s in specs], torch.float32)
            params.frequency = col([s.frequency_penalty for s in specs], torch.float32)
            params.repetition = col([s.repetition_penalty for s in specs], torch.float32)
            params.bias_ids = padded([[i for i, _ in s.logit_bias] for s in specs])
            width = params.bias_ids.shape[-1]
            params.bias_vals = col([[b for _, b in s.logit_bias] + [0.0] * (width - len(s.logit_bias)) for s in specs]
                                   if width else [[] for _ in specs], torch.float32).reshape(len(specs), width)
            generated, prompts = padded([r[3] for r in rows]), padded([s.prompt for s in specs])
            params.counts = torch.zeros(len(rows), vocab, device=device).scatter_add_(
                -1, generated.clamp(min=0), (generated >= 0).float())
            in_prompt = torch.zeros(len(rows), vocab, device=device).scatter_add_(
                -1, prompts.clamp(min=0), (prompts >= 0).float())
            params.seen = (in_prompt > 0) | (params.counts > 0)
        return params

    def advance(self, tokens: torch.Tensor) -> None:
        """After ``tokens`` (n,): one more generated, and Megatron's nucleus decay (``next_top_p``)."""
        self.count += 1
        if self.counts is not None:
            self.counts.scatter_add_(-1, tokens.unsqueeze(-1), torch.ones_like(tokens, dtype=self.counts.dtype).unsqueeze(-1))
            self.seen.scatter_(-1, tokens.unsqueeze(-1), True)
        decayed = self.top_p * self.top_p_decay
        decayed = torch.where(self.top_p_bound > 0, torch.maximum(decayed, self.top_p_bound), decayed)
        self.top_p = torch.where((self.top_p > 0) & (self.top_p_decay > 0), decayed, self.top_p)


def _ban(x: torch.Tensor, ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """-inf at ``ids`` (n, k; -1 = none) of the rows where ``active`` (n,)."""
    if ids.shape[-1] == 0:
        return x
    on = (ids >= 0) & active.unsqueeze(-1)
    vals = torch.where(on, float("-inf"), float("inf")).to(x.dtype)
    return x.scatter_reduce(-1, ids.clamp(min=0), vals, reduce="amin")


def penalize_batch(logits: torch.Tensor, params: BatchParams) -> torch.Tensor:
    """``penalize`` for every row at once on the device (the same arithmetic, in the same order):
    presence/frequency over generated tokens, repetition over prompt and generated, logit bias."""
    if params.counts is None:
        return logits
    x, c = logits.float(), params.counts
    x = x - (params.frequency.unsqueeze(-1) * c + params.presence.unsqueeze(-1) * (c > 0).to(x.dtype))
    rep = params.repetition.unsqueeze(-1)
    x = torch.where(params.seen, torch.where(x > 0, x / rep, x * rep), x)
    if params.bias_ids.shape[-1]:
        x = x.scatter_add(-1, params.bias_ids.clamp(min=0), torch.where(params.bias_ids >= 0, params.bias_vals, 0.0))
    return x


def sample_batch(logits: torch.Tensor, params: BatchParams, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n,), log-probabilities of the tokens under the unfiltered logits (n,)); ``last``
    (n,) is each row's previous token (for the newline-after-colon ban). No host sync."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    x = _ban(logits, params.stop, params.count < params.min_tokens)
    x = _ban(x, params.newline, (params.colon == last.unsqueeze(-1)).any(-1))
    tokens = x.argmax(-1)
    if params.any_sampled:
        f = filter_batch(x, params.temperature, params.top_k, params.top_p, params.min_p,
                         params.max_k, params.use_top_p, params.use_min_p)
        u = uniform_noise(params.seed, params.count, x.shape[-1])
        drawn = (f - torch.log(-torch.log(u))).argmax(-1)
        tokens = torch.where(params.greedy, tokens, drawn)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def next_top_p(top_p: float, decay: float, bound: float) -> float:
    """Megatron's per-token nucleus decay: top_p *= decay, floored at bound."""
    if top_p > 0.0 and decay > 0.0:
        top_p *= decay
        if bound > 0.0:
            top_p = max(top_p, bound)
    return top_p


def penalize(logits: torch.Tensor, generated: list[int], prompt: list[int], presence: float, frequency: float,
             repetition: float, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """One row (V,) with OpenAI's presence/frequency penalties (over the generated tokens), HF's
    repetition penalty (over prompt and generated tokens) and ``logit_bias`` applied."""
    x = logits
    if (presence or frequency) and generated:
        ids, counts = torch.tensor(generated, device=x.device).unique(return_counts=True)
        x = x.index_add(0, ids, -(frequency * counts.to(x.dtype) + presence))
    if repetition != 1.0 and (generated or prompt):
        ids = torch.tensor(prompt + generated, device=x.device).unique()
        seen = x[ids]
        x = x.index_copy(0, ids, torch.where(seen > 0, seen / repetition, seen * repetition))
    if bias:
        ids = torch.tensor([i for i, _ in bias], device=x.device)
        x = x.index_add(0, ids, torch.tensor([b for _, b in bias], dtype=x.dtype, device=x.device))
    return x


def top_alternatives(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The ``k`` most likely (id, log-prob) of every row of ``logp`` (N, V)."""
    if k <= 0:
        return [[] for _ in range(logp.shape[0])]
    vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
