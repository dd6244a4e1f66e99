"""The project's checkpoint format: per-rank safetensors files and a manifest written last.

    <dir>/model_tp{t}_pp{p}.safetensors   local megatron-core names (layer 0 = first of the stage)
    <dir>/tokenizer/...                   an HF tokenizer (see shared.tokenizer)
    <dir>/manifest.json                   everything needed to use the files (see ``Manifest``)

A directory without ``manifest.json`` is not a checkpoint. Everything the loader needs comes
from the manifest (architecture, layout, dtype, vocab); nothing is guessed from names.
Loading at another TP/PP reshards through ``layout.unshard``/``layout.shard``, one parameter
at a time.

Each tensor is stored once. With tied embeddings and PP > 1 the last stage's output layer is
the first stage's embedding shard of the same TP rank (``layout.tied_output_layer`` in the
manifest), and ``load_rank_state_dict`` reads it from there; format version 1 stored a copy
in the last stage's files, which is still read.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from shared.config import ModelConfig
from shared.files import lower_thread_priority, usable_cpus
from shared.checkpoint import layout as param_layout
from shared.checkpoint.layout import Layout, ParamSpec
from shared.checkpoint.errors import CheckpointError
from shared.checkpoint.tensors import TensorSource
from shared.checkpoint.writer import StreamingSafetensorsWriter
from shared.dtypes import dtype_name, parse_dtype
from shared.files import sha256_file

FORMAT = "llama-megatron-native"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the last stage also stored its copy of a tied embedding
MANIFEST = "manifest.json"
CONVERTER_VERSION = "llama-megatron-svc convert 1"


def rank_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.safetensors"


def shard_shape(spec: ParamSpec, cfg: ModelConfig, layout: Layout) -> tuple[int, ...]:
    """The shape of one TP rank's piece of ``spec`` (what ``layout.shard`` returns)."""
    T = layout.tp
    first = param_layout.hf_shape(cfg, spec.hf_names[0])
    if spec.kind == param_layout.REPLICATED:
        return first
    if spec.kind == param_layout.ROW:
        return (first[0], first[1] // T)
    if spec.kind == param_layout.VOCAB:
        return (layout.padded_vocab(cfg) // T, first[1])
    if spec.kind == param_layout.QKV:
        return (cfg.qkv_rows // T, *first[1:])
    if spec.kind == param_layout.FC1:
        return (2 * first[0] // T, first[1])
    raise ValueError(f"unknown split kind {spec.kind!r}")


def stored_specs(cfg: ModelConfig, layout: Layout) -> list[ParamSpec]:
    """The parameters the rank files hold, in model order: all but the copy of a tied embedding."""
    return [s for s in param_layout.param_specs(cfg, layout) if not param_layout.is_tied_copy(s, cfg)]


def rank_entries(cfg: ModelConfig, layout: Layout, dtype: torch.dtype
                 ) -> dict[tuple[int, int], list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """(tp, pp) -> [(local name, shape, dtype)] in model order: the content of every rank file."""
    out: dict[tuple[int, int], list] = {r: [] for r in layout.ranks()}
    for spec in stored_specs(cfg, layout):
        p = spec.pp_rank(cfg, layout)
        shape = shard_shape(spec, cfg, layout)
        for t in range(layout.tp):
            out[(t, p)].append((spec.local_name(cfg, layout), shape, dtype))
    return out


def layout_dict(cfg: ModelConfig, layout: Layout) -> dict[str, Any]:
    return {
        "tp": layout.tp, "pp": layout.pp, "divisible_by": layout.divisible_by,
        "stages": [[r.start, r.stop] for r in (layout.stage_layers(cfg, p) for p in range(layout.pp))],
        "vocab_size": cfg.vocab_size, "padded_vocab_size": layout.padded_vocab(cfg),
        "rank_files": {f"{t},{p}": rank_file(t, p) for t, p in layout.ranks()},
        "tied_output_layer": ("stored once: the last stage's output_layer.weight is "
                              "embedding.word_embeddings.weight of stage 0, same TP rank")
        if cfg.tie_word_embeddings and layout.pp > 1 else None,
    }


# ---- the manifest ---------------------------------------------------------------------------

@dataclass
class Manifest:
    directory: Path
    config: ModelConfig
    layout: Layout
    dtype: torch.dtype
    raw: dict[str, Any] = field(repr=False)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.raw["files"]

    @property
    def source_config(self) -> dict[str, Any] | None:
        return self.raw.get("source_config")

    @property
    def parity(self) -> dict[str, Any] | None:
        return self.raw.get("parity")

    def rank_path(self, tp_rank: int, pp_rank: int) -> Path:
        return self.directory / self.raw["layout"]["rank_files"][f"{tp_rank},{pp_rank}"]

    def rank_names(self) -> dict[tuple[int, int], str]:
        return {tuple(int(x) for x in k.split(",")): v for k, v in self.raw["layout"]["rank_files"].items()}


def declared_format(directory: str | Path) -> str | None:
    """What a directory says it is: ``"native"`` (its manifest is this format's), ``"hf"`` (an
    HF checkpoint as the object store fetched it: a store manifest saying ``format: hf``) or
    ``None`` (no manifest)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "native"  # load_manifest explains
    return "hf" if isinstance(raw, dict) and raw.get("format") == "hf" else "native"


def load_manifest(directory: str | Path) -> Manifest:
    d = Path(directory)
    path = d / MANIFEST
    if not path.exists():
        hint = (" It looks like an HF checkpoint: convert it with `python -m services.convert --loader "
                "llama_mistral --checkpoint-type hf`." if (d / "config.json").exists() else
                " A conversion that did not finish leaves no manifest; convert again.")
        raise CheckpointError(f"{d} is not a checkpoint: it has no {MANIFEST}.{hint}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
    if raw.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format version {raw.get('format_version')} is not supported (this code "
                              f"reads {', '.join(map(str, READABLE_VERSIONS))}); convert it with a newer version")
    cfg = ModelConfig.from_dict(raw["model"])
    lay = raw["layout"]
    layout = Layout(tp=int(lay["tp"]), pp=int(lay["pp"]), divisible_by=int(lay["divisible_by"]))
    return Manifest(d, cfg, layout, parse_dtype(raw["dtype"]), raw)


def _hash_files(directory: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(max(1, min(len(names), usable_cpus()))) as pool:
        digests = list(pool.map(lambda n: sha256_file(directory / n), names))
    return {n: {"sha256": h, "bytes": (directory / n).stat().st_size} for n, h in zip(names, digests)}


def write_manifest(directory: Path, cfg: ModelConfig, layout: Layout, dtype: torch.dtype, *,
                   file_hashes: Mapping[str, Mapping[str, Any]] | None = None,
                   source_config: Mapping[str, Any] | None = None,
                   generation_config: Mapping[str, Any] | None = None,
                   tokenizer: Mapping[str, Any] | None = None,
                   provenance: Mapping[str, Any] | None = None,
                   parity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` last and atomically. Files not in ``file_hashes`` are hashed here."""
    directory = Path(directory)
    present = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                     if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))
    missing = [rank_file(t, p) for t, p in layout.ranks() if rank_file(t, p) not in present]
    if missing:
        raise CheckpointError(f"cannot finish the checkpoint: rank files {missing} were not written")
    known = dict(file_hashes or {})
    known.update(_hash_files(directory, [n for n in present if n not in known]))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "source_config": dict(source_config) if source_config is not None else None,
        "generation_config": dict(generation_config) if generation_config is not None else None,
        "layout": layout_dict(cfg, layout),
        "dtype": dtype_name(dtype),
        "tokenizer": dict(tokenizer) if tokenizer else None,
        "files": {n: dict(known[n]) for n in present},
        "provenance": {"converter": CONVERTER_VERSION,
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       **(provenance or {})},
        "parity": dict(parity) if parity is not None else None,
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def verify(directory: str | Path) -> Manifest:
    """Check every file against the manifest's sha256; raises CheckpointError naming the bad ones."""
    m = load_manifest(directory)
    bad = [n for n in m.files if not (m.directory / n).is_file()]
    if bad:
        raise CheckpointError(f"{m.directory}: files listed in the manifest are missing: {bad}")
    actual = _hash_files(m.directory, list(m.files))
    bad = [n for n, info in m.files.items() if actual[n]["sha256"] != info["sha256"]]
    if bad:
        raise CheckpointError(f"{m.directory}: files do not match their sha256 in the manifest (corrupt): {bad}")
    return m


# ---- streaming writer -----------------------------------------------------------------------

class CheckpointWriter:
    """Rank files laid out up front and filled one tensor at a time, in a pipeline.

    ``add`` takes a tensor as the pieces ``layout.shard_pieces`` makes (views of the source
    where possible), so no shard is assembled in memory. One thread writes each piece at its
    offset - a piece that is a mapped range of a source file is copied by the kernel - and
    hands finished stretches to the disk; others hash the pieces in file order at a lower
    priority, so the disk is fed first and hashing fills the time the disk takes. A file's
    sha256 is one sequential pass, so files are spread over ``hash_threads`` threads (default:
    one per spare CPU, at most one per file): on a large machine a TP·PP checkpoint hashes in
    parallel, on a two-core one a single thread leaves a core to the writes. Every piece
    queued counts against ``max_pending_bytes``: one that owns memory (a shard assembled or
    cast) holds it until written and hashed, and a mapped source range holds the pages its hash
    has read - with a slow disk the hash runs ahead of the writes, and without the bound the
    whole source would end up resident.
    """

    def __init__(self, directory: Path, cfg: ModelConfig, layout: Layout, dtype: torch.dtype,
                 max_pending_bytes: int = 128 << 20, hash_threads: int | None = None) -> None:
        layout.check(cfg)
        self.directory, self.cfg, self.layout, self.dtype = Path(directory), cfg, layout, dtype
        self._files: dict[tuple[int, int], StreamingSafetensorsWriter] = {}
        self._hashes: dict[str, dict[str, Any]] = {}
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="ckpt-write")
        n_hash = hash_threads or max(1, min(len(layout.ranks()), usable_cpus() - 1))
        # one single-thread executor per group of files: each file's updates stay in order
        self._hashing = [ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash", initializer=lower_thread_priority,
                                            initargs=(5,)) for _ in range(n_hash)]
        self._hasher_of = {rank: self._hashing[i % n_hash] for i, rank in enumerate(layout.ranks())}
        self._syncing = ThreadPoolExecutor(1, thread_name_prefix="ckpt-sync")
        self._pending: deque[tuple[Future, int]] = deque()
        self._pending_bytes = 0
        self._max_pending = max_pending_bytes
        meta = {"format": "pt"}
        entries = rank_entries(cfg, layout, dtype)
        try:
            for rank, rank_list in entries.items():
                self._files[rank] = StreamingSafetensorsWriter(self.directory / rank_file(*rank), rank_list, meta,
                                                               syncer=self._syncing)
        except BaseException:
            self.abort()
            raise
        self.bytes_total = sum(torch.Size(shape).numel() * dt.itemsize
                               for rank_list in entries.values() for _, shape, dt in rank_list)

    def add(self, tp_rank: int, pp_rank: int, local_name: str, pieces: Sequence[torch.Tensor]) -> None:
        w, hashing = self._files[(tp_rank, pp_rank)], self._hasher_of[(tp_rank, pp_rank)]
        placed = w.place(local_name, [p.to(self.dtype) for p in pieces])
        for data, at, source in placed:
            self._track(self._writes.submit(w.write_at, data, at, source), data.nbytes)
            self._track(hashing.submit(w.hash, data), data.nbytes)
        if w.complete:
            self._track(hashing.submit(self._finish, w), 0)

    def _finish(self, w: StreamingSafetensorsWriter) -> None:
        """Runs on the file's hashing thread after its last hash update."""
        self._hashes[w.path.name] = {"sha256": w.digest(), "bytes": w.nbytes}

    def _track(self, fut: Future, nbytes: int) -> None:
        self._pending.append((fut, nbytes))
        self._pending_bytes += nbytes
        while self._pending and (self._pending_bytes > self._max_pending or self._pending[0][0].done()):
            done, size = self._pending.popleft()
            done.result()  # re-raises a write error here, in the caller's thread
            self._pending_bytes -= size

    def flush(self) -> dict[str, dict[str, Any]]:
        """Wait for all writes; returns {file name: {sha256, bytes}} of the rank files."""
        while self._pending:
            self._pending.popleft()[0].result()
        self._pending_bytes = 0
        incomplete = [w.path.name for w in self._files.values() if not w.complete]
        if incomplete:
            raise CheckpointError(f"rank files {incomplete} did not receive all their tensors")
        for pool in (self._writes, *self._hashing, self._syncing):
            pool.shutdown()
        # every file to disk at the end, together: a sync in the middle would stall the pipeline
        # on the disk's cache flush, and concurrent syncs share one journal commit
        with ThreadPoolExecutor(min(8, len(self._files))) as pool:
            list(pool.map(lambda w: w.close(), self._files.values()))
        return dict(self._hashes)

    def abort(self) -> None:
        for fut, _ in self._pending:
            fut.cancel()
        for pool in (*self._hashing, self._writes, self._syncing):
            pool.shutdown(wait=True, cancel_futures=True)
        for w in self._files.values():
            w.abort()


def write_checkpoint(directory: Path, cfg: ModelConfig, layout: Layout, hf_tensors: Mapping[str, torch.Tensor] | TensorSource,
                     dtype: torch.dtype | None = None, **manifest_fields: Any) -> dict[str, Any]:
    """Write a whole checkpoint from HF-named tensors into ``directory`` (which must be empty or new).

    For atomic replacement of an existing checkpoint wrap this in ``staging.staging_dir``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    get = hf_tensors.get if isinstance(hf_tensors, TensorSource) else hf_tensors.__getitem__
    if dtype is None:
        dtype = (hf_tensors.dtype(param_layout.hf_names(cfg)[0]) if isinstance(hf_tensors, TensorSource)
                 else hf_tensors[param_layout.hf_names(cfg)[0]].dtype)
    writer = CheckpointWriter(directory, cfg, layout, dtype)
    try:
        for spec in stored_specs(cfg, layout):
            p = spec.pp_rank(cfg, layout)
            hf = [param_layout.trim_vocab(spec, get(n), cfg) for n in spec.hf_names]
            for t, pieces in enumerate(param_layout.shard_pieces(spec, hf, cfg, layout)):
                writer.add(t, p, spec.local_name(cfg, layout), pieces)
        hashes = writer.flush()
    except BaseException:
        writer.abort()
        raise
    return write_manifest(directory, cfg, layout, dtype, file_hashes=hashes, **manifest_fields)


# ---- reading --------------------------------------------------------------------------------

class ShardedSource(TensorSource):
    """HF-named tensors of a sharded checkpoint, unsharded one parameter at a time.

    ``get_local(tp, pp, local_name)`` reads one rank's tensor; only the parameter last asked
    for is kept, so memory stays at one full parameter.
    """

    def __init__(self, cfg: ModelConfig, layout: Layout, dtype: torch.dtype,
                 get_local: Callable[[int, int, str], torch.Tensor]) -> None:
        super().__init__()
        self.cfg, self.layout, self._get_local = cfg, layout, get_local
        self._spec_of: dict[str, ParamSpec] = {}
        for spec in stored_specs(cfg, layout):
            for n in spec.hf_names:
                self._spec_of[n] = spec
                self._shapes[n] = param_layout.hf_shape(cfg, n)
                self._dtypes[n] = dtype
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def specs(self) -> list[ParamSpec]:
        seen, out = set(), []
        for spec in self._spec_of.values():
            if spec.name not in seen:
                seen.add(spec.name)
                out.append(spec)
        return out

    def get(self, name: str) -> torch.Tensor:
        if name not in self._spec_of:
            raise CheckpointError(f"tensor {name!r} is not part of this checkpoint")
        spec = self._spec_of[name]
        if self._cached is None or self._cached[0] != spec.name:
            p = spec.pp_rank(self.cfg, self.layout)
            local = spec.local_name(self.cfg, self.layout)
            shards = [self._get_local(t, p, local) for t in range(self.layout.tp)]
            self._cached = (spec.name, dict(zip(spec.hf_names, param_layout.unshard(spec, shards, self.cfg, self.layout))))
        return self._cached[1][name]


class RankFiles:
    """safetensors handles of a native checkpoint's rank files, opened on first use."""

    def __init__(self, directory: Path, names: Mapping[tuple[int, int], str] | None = None) -> None:
        self.directory = Path(directory)
        self._names = names
        self._handles: dict[tuple[int, int], Any] = {}

    def get(self, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = (tp_rank, pp_rank)
        if key not in self._handles:
            path = self.directory / (self._names[key] if self._names else rank_file(*key))
            if not path.exists():
                raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (run verify)")
            self._handles[key] = safe_open(str(path), framework="pt")
        return self._handles[key].get_tensor(name)


def open_native(directory: str | Path) -> tuple[Manifest, ShardedSource]:
    m = load_manifest(directory)
    return m, ShardedSource(m.config, m.layout, m.dtype, RankFiles(m.directory, m.rank_names()).get)


def iter_hf_tensors(directory: str | Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of the checkpoint, one parameter in memory at a time."""
    m, src = open_native(directory)
    for name in param_layout.hf_names(m.config):
        t = src.get(name)
        yield name, (t.to(dtype) if dtype is not None else t)


def load_rank_state_dict(directory: str | Path, tp_rank: int, pp_rank: int, target: Layout | None = None,
                         dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The local state dict of one (tp, pp) rank, resharded when ``target`` differs from the files."""
    m = load_manifest(directory)
    target = target or m.layout
    target.check(m.config)
    if not (0 <= tp_rank < target.tp and 0 <= pp_rank < target.pp):
        raise CheckpointError(f"rank (tp={tp_rank}, pp={pp_rank}) is outside TP={target.tp} x PP={target.pp}")
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    if target == m.layout:
        from safetensors import safe_open

        with safe_open(str(m.rank_path(tp_rank, pp_rank)), framework="pt") as f:
            out = {k: cast(f.get_tensor(k)) for k in f.keys()}
        if m.config.tie_word_embeddings and pp_rank == m.layout.pp - 1 > 0 and "output_layer.weight" not in out:
            with safe_open(str(m.rank_path(tp_rank, 0)), framework="pt") as f:
                out["output_layer.weight"] = cast(f.get_tensor("embedding.word_embeddings.weight"))
        return out
    return shards_for_rank(ShardedSource(m.config, m.layout, m.dtype, RankFiles(m.directory, m.rank_names()).get),
                           m.config, target, tp_rank, pp_rank, cast)


def shards_for_rank(src: TensorSource, cfg: ModelConfig, target: Layout, tp_rank: int, pp_rank: int,
                    cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
    out = {}
    for spec in param_layout.param_specs(cfg, target):
        if spec.pp_rank(cfg, target) != pp_rank:
            continue
        hf = [param_layout.trim_vocab(spec, src.get(n), cfg) for n in spec.hf_names]
        out[spec.local_name(cfg, target)] = cast(param_layout.shard(spec, hf, cfg, target)[tp_rank])
    return out
