"""Writing a job's results as JSON (bench, load test, acceptance eval, tree search), with the
machine they were measured on."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from sdsat.hardware import isa_cap, native_bf16_cpu

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "asimd", "sve")


def write_json(path: str | Path, result: dict) -> None:
    """Write ``result`` to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def machine_info() -> dict:
    """What decides pass costs here: CPU model and the flags that matter (native bf16 or not),
    a kernel cap (``ONEDNN_MAX_CPU_ISA``, sdsat/hardware.py) and whether bf16 is native under
    it, cores, torch threads and the GPU if one is used (where torch is imported: an HTTP
    client that does not load it reports neither)."""
    torch = sys.modules.get("torch")
    info = {
        "arch": platform.machine(),
        "cpu": platform.processor() or "",
        "cpu_flags": [],
        "cores": None,
        "torch_threads": torch.get_num_threads() if torch else None,
        "gpu": torch.cuda.get_device_name(0) if torch and torch.cuda.is_available() else None,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "model name" not in info:
            info["cpu"] = info["model name"] = value.strip()
        elif key in ("flags", "Features") and not info["cpu_flags"]:
            have = set(value.split())
            info["cpu_flags"] = [f for f in CPU_FLAGS if f in have]
    info.pop("model name", None)
    cap = isa_cap()
    if cap:
        info["isa_cap"] = cap
    info["native_bf16"] = native_bf16_cpu(set(info["cpu_flags"]))
    info["cores"] = text.count("\nprocessor") + text.startswith("processor")
    return info


def sat_info(loaded) -> dict:
    """Which SATs a run used: their count, whether an adapter and a draft head (its width)
    came with them, and a short digest of their weight files (results from different
    artifacts stay apart)."""
    import hashlib

    from sdsat.model.load import artifact_dir

    sat = loaded.sat
    if sat is None:
        return {"num_sat": 0}
    folder = artifact_dir(loaded.source) or (Path(loaded.path) if loaded.path and Path(loaded.path).is_dir() else None)
    digest = hashlib.sha256()
    for name in ("sdsat_adapter.safetensors", "sdsat_head.safetensors"):
        if folder is not None and (folder / name).exists():
            digest.update((folder / name).read_bytes())
    return {"num_sat": sat.num_sat, "adapter": bool(sat.adapter), "head": sat.head.get("width", 0) if sat.head else 0,
            "weights": digest.hexdigest()[:12] if folder is not None else None}
