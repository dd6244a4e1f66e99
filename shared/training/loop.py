"""The training run: data, processes, the iteration loop, checkpoints and the final exports.

This process owns the data (it hands every iteration's global batch to the ranks), the
schedule of evaluations and saves, the metrics and the progress callbacks; the ranks own the
model and the optimizer (shared/training/rank.py).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from shared.checkpoint.layout import Layout
from shared.checkpoint.staging import staging_dir
from shared.config import ModelConfig
from shared.parallel.dims import ParallelDims
from shared.training import rank as rank_fns
from shared.training.checkpoint import STATE, Checkpoint, iteration_dir, resolve_load, write_latest
from shared.specs.train import ConfigError, TrainConfig
from shared.training.data import PackedData, batch_indices, build_datasets
from shared.training.memory import check_fits
from shared.training.optim import learning_rate

Progress = Callable[[dict], None]


class Cancelled(Exception):
    """The run stopped on request after saving a checkpoint (``checkpoint``, at ``iteration``)."""

    def __init__(self, message: str, iteration: int, checkpoint: str | None):
        super().__init__(message)
        self.iteration, self.checkpoint = iteration, checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message names the last good checkpoint."""


def _model_config(src: Checkpoint) -> tuple[ModelConfig, dict[str, Any]]:
    """The architecture and the fields a manifest carries forward (generation config, source config)."""
    if src.format == "native":
        return src.config, {"generation_config": src.generation, "source_config": src.source_config}
    from shared.checkpoint.hf import generation_config

    return src.config, {"generation_config": src.generation or generation_config(src.config),
                        "source_config": src.source_config}


def _tokenizer_dir(src: Checkpoint) -> Path:
    if src.tokenizer_dir is None:
        src.tokenizer()  # raises the error that says what to add
    return Path(src.tokenizer_dir)


def _check_resume(config: TrainConfig, state: dict[str, Any], train: PackedData) -> None:
    old = state["config"]
    if (old["tensor_model_parallel_size"], old["pipeline_model_parallel_size"]) != (config.tp, config.pp):
        raise ConfigError(
            f"the checkpoint was trained at TP={old['tensor_model_parallel_size']} PP="
            f"{old['pipeline_model_parallel_size']}; resume with those sizes, or pass --finetune to start a "
            "new run from its weights at another layout")
    if old["finetune_method"] != config.finetune_method:
        raise ConfigError(f"the checkpoint is a {old['finetune_method']} run; resume it with "
                          f"--finetune-method {old['finetune_method']}")
    if state["data_fingerprint"] != train.fingerprint():
        raise ConfigError("the training data (after tokenizing and packing) differs from the checkpoint's run, so "
                          "its data position is meaningless; resume with the same --data-path, --seq-length and "
                          "--seed, or pass --finetune to start a new run from its weights")


class _Run:
    """One training run in the coordinating process."""

    def __init__(self, config: TrainConfig, progress: Progress | None, should_cancel: Callable[[], bool] | None,
                 pool, devices=None):
        from shared.tokenizer import load_source_tokenizer

        self.config, self.progress, self.should_cancel = config, progress or (lambda e: None), should_cancel
        self.save = Path(config.save)
        src = resolve_load(config.load)
        if src.state is not None and src.state["config"]["finetune_method"] == "lora" and config.finetune:
            raise ConfigError(f"{src.directory} holds a LoRA run's frozen base weights; load its run's release/ "
                              "directory (the merged model) to finetune further")
        self.cfg, self.carry = _model_config(src)
        self.dims = ParallelDims(config.tp, config.pp, config.dp)
        self.dims.check_model(self.cfg)
        self.layout = Layout(config.tp, config.pp, config.make_vocab_size_divisible_by)
        self.tokenizer_dir = _tokenizer_dir(src)
        self.tokenizer = load_source_tokenizer(self.tokenizer_dir)
        self.train_data, self.valid_data = build_datasets(
            self.tokenizer, config.data_path, config.seq_length, config.seed, valid_path=config.valid_data_path,
            valid_fraction=config.valid_fraction, overlong=config.overlong, vocab_size=self.cfg.vocab_size)
        resume = src.state is not None and not config.finetune
        if resume:
            _check_resume(config, src.state, self.train_data)
        self.start = src.state["iteration"] if resume else 0
        self.last_checkpoint = str(src.directory) if resume else None
        self.plan = rank_fns.RankPlan(config, self.cfg.to_dict(), src, str(src.directory) if resume else None)
        self.dtype = torch.bfloat16 if config.bf16 else torch.float32
        self.key = f"train-{uuid.uuid4().hex}"
        self.pool, self.own_pool, self.devices = pool, pool is None, devices

    # ---- process plumbing --------------------------------------------------------------------
    def _call(self, fn, *args) -> list[Any]:
        return self.pool.run(self.dims, fn, self.key, *args)

    def _from_last_stage(self, results: list[Any]) -> Any:
        return results[self.dims.rank(0, self.dims.pp - 1, 0)]

    def _emit(self, event: dict[str, Any], metrics) -> None:
        if metrics is not None:
            metrics.write(json.dumps(event) + "\n")
            metrics.flush()
        self.progress(event)

    # ---- checkpoints -------------------------------------------------------------------------
    def _manifest(self, directory: Path, provenance: dict[str, Any]) -> None:
        from shared.checkpoint.native import write_manifest
        from shared.tokenizer import save_tokenizer

        save_tokenizer(self.tokenizer_dir, directory / "tokenizer")
        write_manifest(directory, self.cfg, self.layout, self.dtype, tokenizer={"dir": "tokenizer"},
                       generation_config=self.carry["generation_config"], source_config=self.carry["source_config"],
                       provenance={"training": provenance})

    def save_checkpoint(self, iteration: int) -> str:
        final = iteration_dir(self.save, iteration)
        with staging_dir(final, overwrite=True) as tmp:
            (tmp / "training").mkdir()
            self._call(rank_fns.rank_save, str(tmp))
            state = {"iteration": iteration, "config": self.config.to_dict(),
                     "data_fingerprint": self.train_data.fingerprint(), "data": self.train_data.stats,
                     "world_size": self.dims.world_size}
            (tmp / STATE).write_text(json.dumps(state, indent=2))
            self._manifest(tmp, {"iteration": iteration, "finetune_method": self.config.finetune_method,
                                 "model_files": "base weights (adapters in training/)" if self.config.lora
                                 else "trained weights"})
        write_latest(self.save, iteration)
        self.last_checkpoint = str(final)
        return str(final)

    def export(self, iteration: int) -> dict[str, str]:
        """The finished model: native (merged for LoRA), HF, and the LoRA adapters alone."""
        out: dict[str, str] = {}
        lora_ctx = staging_dir(self.save / "lora", overwrite=True) if self.config.lora else nullcontext(None)
        with lora_ctx as lora_tmp, staging_dir(self.save / "release", overwrite=True) as tmp:
            self._call(rank_fns.rank_save, str(tmp), True, str(lora_tmp) if lora_tmp else None)
            self._manifest(tmp, {"iteration": iteration, "finetune_method": self.config.finetune_method,
                                 "model_files": "merged weights" if self.config.lora else "trained weights"})
            if lora_tmp is not None:
                c = self.config
                (lora_tmp / "adapter_config.json").write_text(json.dumps({
                    "r": c.lora_rank, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
                    "target_modules": list(c.lora_targets), "tp": c.tp, "pp": c.pp,
                    "files": "adapter_tp{t}_pp{p}.safetensors (local layer numbers, TP shards of the run)",
                    "base": str(self.config.load)}, indent=2))
        out["checkpoint"] = str(self.save / "release")
        if self.config.lora:
            out["lora"] = str(self.save / "lora")
        if self.config.export_hf:
            from shared.checkpoint.hf import write_hf
            from shared.checkpoint.native import iter_hf_tensors
            from shared.tokenizer import save_tokenizer

            with staging_dir(self.save / "hf", overwrite=True) as tmp:
                write_hf(tmp, self.cfg, iter_hf_tensors(self.save / "release"), self.dtype,
                         generation=self.carry["generation_config"])
                save_tokenizer(self.tokenizer_dir, tmp)
            out["hf"] = str(self.save / "hf")
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def evaluate(self, iteration: int) -> dict[str, Any]:
        c, data = self.config, self.valid_data
        n = c.eval_iters * c.global_batch_size
        idx = torch.arange(n) % len(data)
        loss_sum, targets = 0.0, 0.0
        for k in range(c.eval_iters):
            tokens, mask = data.rows(idx[k * c.global_batch_size:(k + 1) * c.global_batch_size])
            r = self._from_last_stage(self._call(rank_fns.rank_evaluate, tokens, mask))
            loss_sum, targets = loss_sum + r["loss_sum"], targets + r["targets"]
        loss = loss_sum / max(targets, 1.0)
        return {"phase": "eval", "iteration": iteration, "step": iteration, "valid_loss": loss,
                "valid_ppl": math.exp(min(loss, 50.0))}

    def run(self) -> dict[str, Any]:
        c = self.config
        self.save.mkdir(parents=True, exist_ok=True)
        metrics = open(c.metrics_file, "a" if self.start else "w") if c.metrics_file else None
        if self.own_pool:
            from shared.parallel.launcher import ProcessGroupPool

            threads = max(1, (os.cpu_count() or 1) // self.dims.world_size)
            self.pool = ProcessGroupPool(self.dims.world_size, threads=threads, timeout_s=3600, devices=self.devices)
        try:
            check_fits(self.cfg, c, self._call(rank_fns.rank_memory))  # before any rank loads a weight
            counts = self._call(rank_fns.rank_setup, self.plan)
            info = {k: sum(r[k] for r in counts) for k in ("trainable", "parameters")}
            return self._loop(metrics, info)
        finally:
            if metrics is not None:
                metrics.close()
            if not getattr(self.pool, "broken", False):
                try:
                    self._call(rank_fns.rank_teardown)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            if self.own_pool:
                self.pool.close()

    def _loop(self, metrics, info: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        it, saved_at, last, evals = self.start, self.start if self.last_checkpoint else None, {}, []
        t_start, step_times = time.perf_counter(), []
        tokens_per_batch = c.global_batch_size * c.seq_length
        while it < c.train_iters:
            if self.should_cancel is not None and self.should_cancel():
                ckpt = self.last_checkpoint if saved_at == it else self.save_checkpoint(it)
                raise Cancelled(f"cancelled at iteration {it}; checkpoint {ckpt}", it, ckpt)
            tokens, mask = self.train_data.rows(batch_indices(len(self.train_data), c.seed, it, c.global_batch_size))
            lr = learning_rate(it, c)
            t0 = time.perf_counter()
            r = self._call(rank_fns.rank_step, tokens, mask, int(mask.sum()), lr)[0]
            dt = time.perf_counter() - t0
            if not r["finite"]:
                raise TrainingError(
                    f"training diverged: non-finite loss or gradients at iteration {it + 1} (loss {r['loss']}, "
                    f"grad norm {r['grad_norm']}); that step was not applied and nothing was saved after it. Last good "
                    f"checkpoint: {self.last_checkpoint or 'none (none was saved yet)'}. Lower --lr, add "
                    "--lr-warmup-iters or set --clip-grad")
            it += 1
            step_times.append(dt)
            recent = step_times[-20:]
            last = {"phase": "train", "iteration": it, "step": it, "train_iters": c.train_iters,
                    "loss": r["loss"], "lr": lr, "grad_norm": r["grad_norm"],
                    "tokens_per_s": tokens_per_batch / dt, "step_s": dt,
                    "eta_s": (c.train_iters - it) * sum(recent) / len(recent),
                    "current": it, "total": c.train_iters, "unit": "iterations"}
            self._emit(last, metrics)
            if c.eval_interval and it % c.eval_interval == 0 and self.valid_data is not None:
                evals.append(self.evaluate(it))
                self._emit(evals[-1], metrics)
            if c.save_interval and it % c.save_interval == 0:
                self.save_checkpoint(it)
                saved_at = it
            if c.exit_interval and it % c.exit_interval == 0 and it < c.train_iters:
                if saved_at != it:
                    self.save_checkpoint(it)
                return {"status": "exited", "iteration": it, "last_checkpoint": self.last_checkpoint,
                        "loss": last.get("loss"), "data": self.train_data.stats}
        if saved_at != it:
            self.save_checkpoint(it)
        if self.valid_data is not None and (not evals or evals[-1]["iteration"] != it):
            evals.append(self.evaluate(it))
            self._emit(evals[-1], metrics)
        exports = self.export(it)
        return {"status": "completed", "iteration": it, "loss": last.get("loss"),
                "valid_loss": evals[-1]["valid_loss"] if evals else None,
                "last_checkpoint": self.last_checkpoint, **exports,
                "trainable_parameters": info["trainable"], "parameters": info["parameters"], "elapsed_s": time.perf_counter() - t_start,
                "data": self.train_data.stats,
                "valid_data": self.valid_data.stats if self.valid_data is not None else None}


def train(config: TrainConfig, progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
          *, pool=None, devices=None) -> dict[str, Any]:
    """Run (or resume) a finetuning run; returns a summary with the exported checkpoint paths.

    ``progress`` gets one dict per iteration (``step``, ``loss``, ``lr``, ``grad_norm``,
    ``tokens_per_s``, ``eta_s``) and per evaluation (``valid_loss``). When ``should_cancel()``
    turns true the run saves a checkpoint and raises ``Cancelled``. ``pool``: an existing
    process pool (anything with ``run(dims, fn, *args)``) to use instead of starting one;
    ``devices``: the CUDA ordinals the pool it starts may use (default: every visible one).
    Before any weight is loaded, each rank's memory need is estimated and a plan that does
    not fit its GPU is refused (``ConfigError``, with layouts that would fit).
    """
    return _Run(config, progress, should_cancel, pool, devices).run()
