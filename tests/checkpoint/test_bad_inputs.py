"""Each bad input is a clear error naming the problem, and leaves no output behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import uuid

import pytest
import torch

from shared.checkpoint import native
from shared.checkpoint.convert import Cancelled, ConvertOptions, convert
from shared.checkpoint.presets import PresetError
from shared.checkpoint.errors import CheckpointError
from shared.config import UnsupportedModelError
from shared.parallel.dims import LayoutError
from tests.checkpoint.helpers import hf_tensors, run


def nothing_left(out):
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return not out.exists() and not leftovers


def expect_error(src, out, exc, match, **kw):
    with pytest.raises(exc, match=match):
        run(src, out, **kw)
    assert nothing_left(out)


def edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def src(make_hf_checkpoint):
    return make_hf_checkpoint("llama3")


def test_missing_config_weights_and_tokenizer(src, tmp_path):
    out = tmp_path / "out"
    (src / "config.json").rename(src / "config.bak")
    expect_error(src, out, CheckpointError, "no config.json.*--checkpoint-type meta")
    (src / "config.bak").rename(src / "config.json")
    (src / "model.safetensors").rename(tmp_path / "weights")
    expect_error(src, out, CheckpointError, "no weights found")
    (tmp_path / "weights").rename(src / "model.safetensors")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").unlink()
    expect_error(src, out, CheckpointError, "no tokenizer.*--tokenizer-model")


def test_truncated_safetensors(src, tmp_path):
    path = src / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    expect_error(src, tmp_path / "out", CheckpointError, "truncated")


def test_lying_header(src, tmp_path):
    path = src / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.mlp.up_proj.weight"
    header[name]["shape"] = [header[name]["shape"][0] // 2, header[name]["shape"][1]]  # bytes no longer add up
    new = json.dumps(header).encode()
    new += b" " * (n - len(new))
    path.write_bytes(struct.pack("<Q", n) + new + raw[8 + n:])
    expect_error(src, tmp_path / "out", CheckpointError, "header.*corrupt")
    # a header length beyond the file
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    expect_error(src, tmp_path / "out", CheckpointError, "header claims")


def test_absent_shard_named_by_index(src, tmp_path):
    from safetensors.torch import save_file

    sd = hf_tensors(src)
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, src / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < half else
                                                "model-00002-of-00002.safetensors") for i, k in enumerate(names)}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "model.safetensors").unlink()
    expect_error(src, tmp_path / "out", CheckpointError, "model-00002-of-00002.safetensors.*absent")


def test_shape_mismatch(src, tmp_path):
    edit_config(src, intermediate_size=128)
    expect_error(src, tmp_path / "out", CheckpointError, "gate_proj.weight has shape .*config implies")


@pytest.mark.parametrize("change,match", [
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "gelu"),
], ids=["moe", "sliding-window", "rope-yarn", "gelu"])
def test_unsupported_architectures(src, tmp_path, change, match):
    edit_config(src, **change)
    expect_error(src, tmp_path / "out", UnsupportedModelError, match)


def test_llama_attention_bias_is_refused(make_hf_checkpoint, tmp_path):
    """Llama with attention_bias also has o_proj.bias, which the Megatron layout cannot hold."""
    src = make_hf_checkpoint("llama3", attention_bias=True)
    expect_error(src, tmp_path / "out", UnsupportedModelError, "o_proj")


@pytest.mark.parametrize("tp,pp,match", [
    (4, 1, "does not divide the 2 kv heads"),
    (3, 1, "does not divide the 8 attention heads"),
    (1, 3, "does not divide the 4 layers"),
])
def test_bad_parallel_layout(src, tmp_path, tp, pp, match):
    expect_error(src, tmp_path / "out", LayoutError, match, target_tp=tp, target_pp=pp)


def test_tp_not_dividing_ffn(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint("llama2", tokenizer="bpe", intermediate_size=90)
    expect_error(src, tmp_path / "out", LayoutError, "FFN size 90", target_tp=4)


def test_preset_disagreement(src, tmp_path):
    expect_error(src, tmp_path / "out", PresetError, "llama3-8B disagrees.*num_layers is 4", model_size="llama3-8B")
    expect_error(src, tmp_path / "out", PresetError, "unknown --model-size", model_size="llama9-1T")


def test_non_empty_save_dir_and_atomic_overwrite(src, make_hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        run(src, out, validate=False)
    assert (out / "precious.txt").read_text() == "keep me"

    run(src, out, validate=False, overwrite=True)
    assert not (out / "precious.txt").exists()
    first = native.verify(out).raw["files"]["model_tp0_pp0.safetensors"]["sha256"]

    # a failing overwrite leaves the old checkpoint untouched
    with pytest.raises(LayoutError):
        run(src, out, validate=False, overwrite=True, target_tp=3)
    assert native.verify(out).raw["files"]["model_tp0_pp0.safetensors"]["sha256"] == first
    other = make_hf_checkpoint("llama3", seed=1, name="other")
    run(other, out, validate=False, overwrite=True, target_tp=2)
    m = native.verify(out)
    assert m.layout.tp == 2 and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_malicious_pickle_is_refused(src, tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sd = hf_tensors(src)
    sd["model.norm.weight"] = Evil()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    expect_error(src, tmp_path / "out", CheckpointError, "refused to unpickle")
    assert not marker.exists()


def test_safe_bin_checkpoint_converts(src, tmp_path):
    sd = hf_tensors(src)
    torch.save(sd, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    run(src, tmp_path / "out", validate=False)
    run(tmp_path / "out", tmp_path / "hf", loader="mcore", saver="hf", validate=False)
    got = hf_tensors(tmp_path / "hf")
    assert all(torch.equal(sd[k], got[k]) for k in sd)


def test_not_a_checkpoint_and_corrupt_rank_file(src, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint.*looks like an HF checkpoint"):
        run(src, tmp_path / "x", loader="mcore")
    run(src, tmp_path / "out", validate=False)
    f = tmp_path / "out" / "model_tp0_pp0.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(raw)
    with pytest.raises(CheckpointError, match="sha256.*model_tp0_pp0.safetensors"):
        native.verify(tmp_path / "out")


def test_cancel_leaves_nothing(src, tmp_path):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 5

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        convert(ConvertOptions(load_dir=src, save_dir=out, validate=False), should_cancel=cancel)
    assert nothing_left(out)


def test_failed_parity_fails_the_conversion(src, tmp_path, monkeypatch):
    """A conversion whose written weights differ from the source is caught and removed."""
    from shared.checkpoint import layout as param_layout

    real_shard_pieces = param_layout.shard_pieces

    def corrupt(spec, tensors, cfg, layout):
        ranks = real_shard_pieces(spec, tensors, cfg, layout)
        if spec.name == "decoder.layers.1.mlp.linear_fc2.weight":
            ranks = [[p * 1.5 for p in pieces] for pieces in ranks]
        return ranks

    monkeypatch.setattr(param_layout, "shard_pieces", corrupt)
    expect_error(src, tmp_path / "out", CheckpointError, "failed validation.*parity FAIL")


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.fail(f"mounting a tmpfs needs root (CI runs as root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full(src, tiny_disk):
    out = tiny_disk / "out"
    expect_error(src, out, CheckpointError, "disk .* is full", validate=False, target_tp=2)
    assert list(tiny_disk.iterdir()) == []


def test_unexpected_tensor_is_refused(make_hf_checkpoint, tmp_path):
    """A tensor the layout has no place for is an error, never silently dropped."""
    from safetensors.torch import load_file, save_file

    src = make_hf_checkpoint("llama3")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    expect_error(src, tmp_path / "out", CheckpointError, "o_proj.bias.*silently drop")


def test_failed_conversion_stops_hashing_the_source(tmp_path):
    """The provenance hasher starts with the conversion; when the conversion fails it gives up at
    its next chunk instead of reading the rest of a (possibly huge) source."""
    from shared.checkpoint.convert import _Hasher
    from shared.files import Stopped, sha256_file

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    calls = []
    with pytest.raises(Stopped):
        sha256_file(big, chunk=1 << 20, should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert len(calls) == 2  # stopped before the second chunk
    hasher = _Hasher([big, big])
    hasher.stop()
    hasher.start()
    hasher.join(timeout=10)
    assert not hasher.is_alive() and hasher.result == {} and hasher.error is None
    finished = _Hasher([big])
    finished.start()
    assert finished.wait() == {"big.bin": sha256_file(big)}
