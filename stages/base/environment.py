"""What a stage ran on, for its manifest: Python, the versions of the libraries that shape results, the device.

Recorded beside the cache key, not in it: the same inputs and parameters on another machine are
the same work, and the manifest says where each run actually ran.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from .. import __version__

# The libraries whose versions can change a stage's numbers or files.
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "deepspeed", "peft", "numpy", "pyarrow", "datasets")


def runtime_environment() -> dict[str, Any]:
    """Versions are read from package metadata (nothing is imported); the device from torch only if already loaded."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "code_version": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "libraries": versions,
        "device": _device(),
        "cpu_count": os.cpu_count(),
        "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
    }


GPU_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (~1 s) on a Linux machine with no GPU driver loaded.

    A loaded NVIDIA driver shows in /proc/driver/nvidia and /dev/nvidiactl (a container given a GPU
    sees both); WSL2's GPU is /dev/dxg, and AMD's (which torch's ROCm build serves as cuda) /dev/kfd.
    """
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return False
    import torch

    return torch.cuda.is_available()


def _device() -> str:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    return f"cpu: {platform.processor() or platform.machine()}"
