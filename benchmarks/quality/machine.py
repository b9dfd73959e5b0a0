"""What a benchmark result was measured on: CPU model and flags, threads, versions, load.

Recorded with every result: step times on a 2-core machine depend on the vector units
(AVX-512, bf16 support), on how many threads torch uses, and on what else runs (the load
average at the start is kept so a noisy run can be recognised).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return info


def machine_info(device: str = "cpu") -> dict:
    """The machine, as a dict for results files, with a one-line ``summary``."""
    import torch
    import transformers

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    info = {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    info["summary"] = (
        f"{info['cpu']} ({platform.machine()}, {info['cores']} cores, "
        f"{'/'.join(info['cpu_flags']) or 'no AVX flags'}), {info['memory_gib']} GiB, "
        f"torch {info['torch']} with {info['torch_threads']} thread(s)"
        + (f" (OMP_WAIT_POLICY={info['omp_wait_policy']})" if info["omp_wait_policy"] else "")
        + (f", GPU {info['gpu']}" if info["gpu"] else "")
        + (
            f", load average {info['load_average_start'][0]:.1f} at start"
            if info["load_average_start"]
            else ""
        )
    )
    return info
