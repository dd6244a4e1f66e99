"""Top-k / top-p / min-p filtering (Megatron's rules), nucleus decay, per-request generators."""

from __future__ import annotations

import math

import torch

from shared.inference.sampling import filter_logits, next_top_p, sample_row


def test_top_k_keeps_k_best():
    x = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = filter_logits(x, 1.0, 2, 0.0)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = filter_logits(probs.log(), 1.0, 0, 0.6)
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = filter_logits(probs.log(), 1.0, 0, 0.4)  # the best token is always kept
    assert torch.isfinite(out).tolist() == [True, False, False, False]


def test_temperature_and_min_p():
    x = torch.tensor([2.0, 1.0, 0.0])
    assert torch.allclose(filter_logits(x, 2.0, 0, 0.0), x / 2)
    out = filter_logits(torch.tensor([0.6, 0.3, 0.1]).log(), 1.0, 0, 0.0, min_p=0.4)
    assert torch.isfinite(out).tolist() == [True, True, False]


def test_top_p_decay_with_bound():
    p = 0.9
    p = next_top_p(p, 0.5, 0.3)
    assert math.isclose(p, 0.45)
    assert math.isclose(next_top_p(p, 0.5, 0.3), 0.3)
    assert next_top_p(0.0, 0.5, 0.3) == 0.0  # no decay without top_p


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    x = torch.randn(1000)
    draw = lambda seed: [sample_row(x, 1.0, 0, 0.0, 0.0, g) for g in [torch.Generator().manual_seed(seed)]
                         for _ in range(20)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
