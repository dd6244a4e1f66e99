"""The HF transformers reference: the same scoring batches, run by HF's own modelling code."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from shared.evaluation.batching import ScoreBatch, score_from_logits
from shared.dtypes import parse_dtype


class HFModel:
    """An HF causal LM in this process. Same interface as ``engine.ShardedModel``."""

    def __init__(self, path: str | Path, dtype: str | torch.dtype = "fp32", device: str = "cpu",
                 threads: int | None = None):
        from transformers import AutoModelForCausalLM

        from shared.checkpoint.hf import check_hf_dir, read_hf_config
        from shared.config import ModelConfig
        from shared.tokenizer import load_source_tokenizer

        d = Path(path)
        if threads:
            # CPU threads of this process (oversubscribed cores make torch many times slower)
            torch.set_num_threads(int(threads))
        self.cfg = ModelConfig.from_hf(read_hf_config(d))
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.tokenizer = load_source_tokenizer(d)
        check_hf_dir(d)  # transformers opens the shards named in the index by itself
        self.model = AutoModelForCausalLM.from_pretrained(str(d), dtype=self.dtype).to(self.device).eval()

    @torch.no_grad()
    def score(self, batch: ScoreBatch) -> list[tuple[float, bool]]:
        dev = self.device
        G, C = batch.ctx_ids.shape
        N, K = batch.cont_ids.shape
        mask1 = (torch.arange(C).unsqueeze(0) < batch.ctx_lens.unsqueeze(1)).long()
        out = self.model(batch.ctx_ids.to(dev), attention_mask=mask1.to(dev), use_cache=True)
        cont_logits = None
        if K > 1:
            cache = out.cache
            cache.reorder_cache(batch.group.to(dev))  # one cache row per continuation
            # keys: the context's real tokens, then the continuation's own (causal) tokens
            mask2 = torch.cat([mask1[batch.group], torch.ones(N, K - 1, dtype=torch.long)], dim=1)
            cont_logits = self.model(batch.cont_ids[:, :-1].to(dev), attention_mask=mask2.to(dev),
                                     position_ids=batch.second_positions.to(dev), cache=cache,
                                     use_cache=True).logits
        return score_from_logits(batch, out.logits, cont_logits)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new: int, done: Callable[[list[int]], bool] | None = None,
                 chunk: int = 16) -> list[list[int]]:
        """Greedy, one prompt at a time (no padding), with HF's KV cache."""
        out = []
        for p in prompts:
            step = self.model(torch.tensor([p], device=self.device), use_cache=True)
            toks: list[int] = []
            while True:
                toks.append(int(step.logits[0, -1].argmax()))
                if len(toks) >= max_new or (done and len(toks) % chunk == 0 and done(toks)):
                    break
                step = self.model(torch.tensor([[toks[-1]]], device=self.device),
                                  cache=step.cache, use_cache=True)
            out.append(toks)
        return out

    def close(self) -> None:
        self.model = None
