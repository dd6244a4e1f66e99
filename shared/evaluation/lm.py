"""lm-eval model classes: our TP/PP model and the HF reference, with one tokenization path.

Both classes share ``ScoringLM``: prompts are encoded the way lm-eval's own ``hf`` model
encodes them (tokenizer defaults, context/continuation split on the joint encoding, left
truncation to ``max_length``), so the two differ only in the model that runs.

    import shared.evaluation.lm  # registers "llama-megatron" and "llama-megatron-hf"
    lm_eval.simple_evaluate(model="llama-megatron", model_args="load=CKPT,dtype=bf16,tensor_parallel_size=2", ...)
"""

from __future__ import annotations

from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from shared.evaluation.batching import plan_batches

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256


class ScoringLM(TemplateLM):
    """Tokenization, batching and request bookkeeping; ``self.model`` runs the batches.

    ``self.model`` has ``score(ScoreBatch) -> [(logprob, greedy)]``,
    ``generate(prompts, max_new, done) -> [tokens]``, ``tokenizer``, ``cfg`` and ``close()``.
    """

    def __init__(self, model, max_length: int | None = None, batch_tokens: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_length = min(int(max_length or DEFAULT_MAX_LENGTH), model.cfg.max_position_embeddings)
        self.batch_tokens = int(batch_tokens)
        eos = {int(i) for i in model.cfg.eos_token_ids}
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = eos

    # ---- tokenization (lm-eval's hf model semantics) ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kw: dict[str, Any] = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            kw["add_special_tokens"] = False  # the text already carries its BOS
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # ---- scoring ----
    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
        over = len(ctx) + len(cont) - (self.max_length + 1)
        return (ctx[over:] if over > 0 else ctx), cont

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        pairs = [self._truncate(c, k) for c, k in pairs]
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        plan = plan_batches(pairs, self.batch_tokens)
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="Scoring") as bar:
            for owners, batch in plan:
                for idxs, res in zip(owners, self.model.score(batch)):
                    for i in idxs:
                        results[i] = res
                    bar.update(len(idxs))
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.score_pairs([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        scores = self.score_pairs(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---- greedy generation ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            context, kw = req.args
            by_kwargs.setdefault(self._gen_key(kw), []).append(i)
        for key, idxs in by_kwargs.items():
            until, max_new = list(key[0]), key[1]
            prompts = []
            for i in idxs:
                toks = self.tok_encode(requests[i].args[0])
                prompts.append(toks[-(self.max_length - max_new):] if self.max_length > max_new else toks[-1:])

            def done(tokens: list[int]) -> bool:
                return any(t in self.eos_ids for t in tokens) or any(u in self.tok_decode(tokens) for u in until if u)

            for i, toks in zip(idxs, self._generate(prompts, max_new, done)):
                text = self._cut(toks, until)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def _gen_key(self, kw: dict | None) -> tuple:
        kw = dict(kw or {})
        if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0.0:
            raise ValueError("only greedy generation is supported (do_sample=False, temperature=0)")
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        return tuple(until), max_new

    def _generate(self, prompts: list[list[int]], max_new: int, done, batch: int = 16) -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        for s in range(0, len(order), batch):
            chunk = order[s: s + batch]
            for i, toks in zip(chunk, self.model.generate([prompts[i] for i in chunk], max_new, done)):
                out[i] = toks
        return out

    def _cut(self, tokens: list[int], until: list[str]) -> str:
        for j, t in enumerate(tokens):
            if t in self.eos_ids:
                tokens = tokens[:j]
                break
        text = self.tok_decode(tokens)
        for u in until:
            if u:
                text = text.split(u)[0]
        return text

    def close(self) -> None:
        self.model.close()


def _int(v, default):
    return default if v is None else int(v)


@register_model("llama-megatron")
class MegatronLM(ScoringLM):
    """A native checkpoint (or an HF directory, sharded on the fly) run by our TP/PP model."""

    def __init__(self, load: str, dtype: str = "fp32", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, max_length: int | None = None, batch_tokens: int = 1024,
                 pool=None, **_ignored) -> None:
        from shared.evaluation.sharded import ShardedModel

        model = ShardedModel(load, dtype, tp=_int(tensor_parallel_size, 1), pp=_int(pipeline_parallel_size, 1),
                             pool=pool)
        super().__init__(model, max_length, _int(batch_tokens, 1024))


@register_model("llama-megatron-hf")
class HFReferenceLM(ScoringLM):
    """An HF checkpoint run by transformers: the reference our model is compared with."""

    def __init__(self, pretrained: str, dtype: str = "fp32", device: str = "cpu", max_length: int | None = None,
                 batch_tokens: int = 1024, threads: int | None = None, **_ignored) -> None:
        from shared.evaluation.reference import HFModel

        model = HFModel(pretrained, dtype, device, threads=_int(threads, 0) or None)
        super().__init__(model, max_length, _int(batch_tokens, 1024))
