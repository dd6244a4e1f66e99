"""The streaming writer: shards written as pieces, kernel copies of mapped source ranges."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from shared.checkpoint import layout as param_layout
from shared.checkpoint import native
from shared.checkpoint import tensors as tensor_io
from shared.checkpoint import writer as writer_io
from shared.checkpoint.layout import Layout
from shared.config import ModelConfig
from shared.files import MappedFile
from tests.checkpoint.helpers import run
from tests.model.families import make_hf_model


def _digests(ckpt):
    return {n: info["sha256"] for n, info in json.loads((ckpt / "manifest.json").read_text())["files"].items()}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_kernel_copy_and_plain_writes_give_identical_files(make_hf_checkpoint, tmp_path, monkeypatch, tp, pp):
    src = make_hf_checkpoint("llama3")
    copied = []
    real = writer_io.copy_range

    def counting(*args):
        ok = real(*args)
        copied.append(ok)
        return ok

    monkeypatch.setattr(writer_io, "copy_range", counting)
    a = run(src, tmp_path / "copy", target_tp=tp, target_pp=pp, validate=False)
    assert copied and all(copied), "mapped source ranges should be copied by the kernel"
    monkeypatch.setattr(writer_io, "copy_range", lambda *args: False)  # as where copy_file_range is refused
    b = run(src, tmp_path / "plain", target_tp=tp, target_pp=pp, validate=False)
    assert {n: f for n, f in a["files"].items() if n.endswith(".safetensors")} == \
           {n: f for n, f in b["files"].items() if n.endswith(".safetensors")}
    for name in a["files"]:  # and the recorded hashes are the files' real hashes
        assert hashlib.sha256((tmp_path / "copy" / name).read_bytes()).hexdigest() == _digests(tmp_path / "copy")[name]


def test_mapped_tensors_locate_their_file_bytes(make_hf_checkpoint):
    src = make_hf_checkpoint("llama2")
    tensors = tensor_io.open_hf_weights(src, zero_copy=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    q = tensors.get(name)
    rows = q[4:9]  # a row range: contiguous bytes of the file
    fd, offset = MappedFile.locate(rows.data_ptr(), rows.numel() * rows.element_size())
    raw = (src / "model.safetensors").read_bytes()[offset: offset + rows.numel() * 4]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(rows.shape), rows)
    assert MappedFile.locate(q[:, :3].contiguous().data_ptr(), 4) is None  # a copy is not in any map
    assert MappedFile.locate(torch.zeros(4).data_ptr(), 16) is None


@pytest.mark.parametrize("family", ["llama2", "llama3", "tied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_pieces_are_views_that_join_to_the_shard(family, tp):
    cfg = ModelConfig.from_hf(make_hf_model(family).config.to_dict())
    layout = Layout(tp=tp)
    g = torch.Generator().manual_seed(0)
    for spec in param_layout.param_specs(cfg, layout)[:8]:
        hf = [torch.randn(param_layout.hf_shape(cfg, n), generator=g) for n in spec.hf_names]
        ranks = param_layout.shard_pieces(spec, hf, cfg, layout)
        if spec.kind in (param_layout.QKV, param_layout.FC1, param_layout.REPLICATED):  # row ranges of the inputs: nothing copied
            bases = {h.untyped_storage().data_ptr() for h in hf}
            assert all(p.untyped_storage().data_ptr() in bases for pieces in ranks for p in pieces)
        shards = [param_layout.join_pieces(pieces) for pieces in ranks]
        assert all(s.is_contiguous() for s in shards)
        assert all(torch.equal(a, b) for a, b in zip(param_layout.unshard(spec, shards, cfg, layout), hf))


def test_repeated_conversions_copy_the_right_bytes(make_hf_checkpoint, tmp_path, monkeypatch):
    """Maps come and go while the writer runs; an address reused by a new map must never be taken
    for the old one's file range (this once copied a neighbouring layer's bytes)."""
    src = make_hf_checkpoint("llama3")
    real = writer_io.copy_range
    monkeypatch.setattr(writer_io, "copy_range", lambda *args: False)
    run(src, tmp_path / "ref", target_tp=1, target_pp=4, validate=False)
    monkeypatch.setattr(writer_io, "copy_range", real)
    for i in range(12):
        out = tmp_path / f"out{i}"
        manifest = run(src, out, target_tp=1, target_pp=4, validate=False)
        for name in manifest["files"]:
            if name.endswith(".safetensors"):
                assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (i, name)
        native.verify(out)


def test_default_reads_are_owned_so_changes_are_written(make_hf_checkpoint, tmp_path):
    """Tensors from a default source are the caller's (a trainer changes them in place); a writer
    must write what they hold, not copy the file they came from."""
    import torch

    src = make_hf_checkpoint("llama3")
    tensors = tensor_io.open_hf_weights(src)
    name = "model.layers.0.mlp.down_proj.weight"
    t = tensors.get(name)
    assert MappedFile.locate(t.data_ptr(), t.numel() * t.element_size()) is None
    t.mul_(2.0)  # as an optimizer step would
    w = writer_io.StreamingSafetensorsWriter(tmp_path / "x.safetensors", [(name, tuple(t.shape), t.dtype)])
    w.add(name, t)
    w.close()
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "x.safetensors")[name], t)


def test_tied_embedding_is_stored_once_and_loads_on_the_last_stage(make_hf_checkpoint, tmp_path):
    """With PP > 1 the last stage's output layer is not a second copy on disk: it is read from the
    first stage's embedding shard of the same TP rank, and a version-1 checkpoint that stored the
    copy still loads to the same state."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = make_hf_checkpoint("tied")
    ckpt = tmp_path / "ckpt"
    m = run(src, ckpt, target_tp=2, target_pp=2, validate=False)
    assert m["format_version"] == 2 and m["layout"]["tied_output_layer"]
    last = [native.load_rank_state_dict(ckpt, t, 1) for t in range(2)]
    for t in range(2):
        with safe_open(str(ckpt / native.rank_file(t, 1)), framework="pt") as f:
            assert "output_layer.weight" not in f.keys()
        emb = load_file(ckpt / native.rank_file(t, 0))["embedding.word_embeddings.weight"]
        assert torch.equal(last[t]["output_layer.weight"], emb)
    # the embedding really is split per TP rank, so reading the wrong rank's would be caught
    assert not torch.equal(last[0]["output_layer.weight"], last[1]["output_layer.weight"])

    # a version-1 checkpoint: the copy in the last stage's files, the manifest says version 1
    v1 = tmp_path / "v1"
    run(ckpt, v1, loader="mcore", target_tp=2, target_pp=2, validate=False)
    for t in range(2):
        tensors = load_file(v1 / native.rank_file(t, 1))
        tensors["output_layer.weight"] = last[t]["output_layer.weight"] * 3  # distinguishable from the embedding
        save_file(tensors, v1 / native.rank_file(t, 1), metadata={"format": "pt"})
    raw = json.loads((v1 / "manifest.json").read_text())
    raw["format_version"] = 1
    (v1 / "manifest.json").write_text(json.dumps(raw))
    for t in range(2):
        got = native.load_rank_state_dict(v1, t, 1)
        assert torch.equal(got["output_layer.weight"], last[t]["output_layer.weight"] * 3)


def test_pipeline_checkpoint_of_a_tied_model_is_no_larger_than_one_copy(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("tied")
    one = run(src, tmp_path / "pp1", validate=False)
    two = run(src, tmp_path / "pp2", target_pp=2, validate=False)
    size = lambda m: sum(f["bytes"] for n, f in m["files"].items() if n.endswith(".safetensors"))  # noqa: E731
    assert size(two) < size(one) + 4096  # headers only, not a second embedding


def test_hashing_spread_over_threads_gives_the_same_checkpoint(make_hf_checkpoint, tmp_path, monkeypatch):
    """On a machine with spare CPUs each rank file (and each source file) hashes on its own
    thread; the files and the recorded sha256s are the same as with one hashing thread."""
    from shared.checkpoint import convert as convert_mod

    src = make_hf_checkpoint("llama3")
    for name, cpus in (("one", 1), ("many", 8)):
        monkeypatch.setattr(native, "usable_cpus", lambda n=cpus: n)
        monkeypatch.setattr(convert_mod, "usable_cpus", lambda n=cpus: n)
        run(src, tmp_path / name, target_tp=2, target_pp=2, validate=False)
    one, many = _digests(tmp_path / "one"), _digests(tmp_path / "many")
    assert one == many and len([n for n in many if n.endswith(".safetensors")]) == 4
    for name, digest in many.items():
        assert hashlib.sha256((tmp_path / "many" / name).read_bytes()).hexdigest() == digest
    source = json.loads((tmp_path / "many" / "manifest.json").read_text())["provenance"]["source"]["files_sha256"]
    assert source["model.safetensors"] == hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
