"""Facts about the machine an artifact is built on: Jetson release, board, memory, CUDA GPU.

ROS-free and import-light: torch is imported only by :func:`cuda_device`, and only when asked. Every
reader returns an empty value instead of raising when the fact is not available here (no Tegra file,
no GPU), so callers can put the result straight into a cache key or a manifest.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from slm_ros.core.errors import ConfigError

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
MEMINFO = Path("/proc/meminfo")

GiB = 1024 ** 3


def l4t_release(path: Path = TEGRA_RELEASE) -> str:
    """The L4T (Jetson Linux) release, e.g. ``R36.4.0``; empty when not on a Jetson.

    ``/etc/nv_tegra_release`` starts with ``# R36 (release), REVISION: 4.0, GCID: ...``. JetPack 6.1 is
    R36.4.x; an upgrade changes this string, which is why it is part of the engine cache key.
    """
    try:
        first = path.read_text(encoding="ascii", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return ""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    if not match:
        return first.strip().lstrip("# ").strip()
    return f"R{match.group(1)}.{match.group(2)}"


def board_model(path: Path = DEVICE_TREE_MODEL) -> str:
    """The board name from the device tree (e.g. ``NVIDIA Jetson Orin Nano Developer Kit``), or ``""``."""
    try:
        return path.read_bytes().rstrip(b"\x00").decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def is_jetson() -> bool:
    """True on NVIDIA Jetson (Tegra) boards, whose GPU shares memory with the CPU."""
    return bool(l4t_release()) or "jetson" in board_model().lower()


def memory_bytes(path: Path = MEMINFO) -> Tuple[int, int]:
    """``(MemTotal, MemAvailable)`` in bytes from /proc/meminfo; ``(0, 0)`` when unreadable."""
    values: Dict[str, int] = {}
    try:
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[name] = int(parts[0]) * 1024  # meminfo counts kB (KiB)
    except OSError:
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def cpu_info() -> Dict[str, str]:
    """Architecture and CPU model name (information for manifests; not part of CPU cache keys)."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": name}


def cuda_device(index: int = 0) -> Dict[str, str]:
    """Name, compute capability (``sm``, e.g. ``8.7`` on Orin) and memory of CUDA GPU ``index`` as
    PyTorch sees it; empty when torch is missing or sees no GPU."""
    try:
        import torch
    except ImportError:
        return {}
    try:
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return {}
        props = torch.cuda.get_device_properties(index)
    except (RuntimeError, AssertionError):
        return {}
    return {"gpu": props.name, "sm": f"{props.major}.{props.minor}",
            "gpu_memory_bytes": str(int(props.total_memory)), "cuda": str(torch.version.cuda or "")}


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Memory of the device an artifact runs (or is built) on, for the memory planner.

    ``shared`` is True when CPU and GPU use the same memory (Jetson, and plain CPU hosts): then the OS,
    ROS and every other process compete with the model for ``total_bytes``, and ``reserve_bytes`` is
    what is kept for them. On a discrete GPU ``total_bytes`` is GPU memory only.
    """

    name: str
    total_bytes: int
    shared: bool = True
    reserve_bytes: int = 0

    @property
    def available_bytes(self) -> int:
        """Bytes a model may use: total minus the reserve (never negative)."""
        return max(0, self.total_bytes - self.reserve_bytes)


#: Kept free on a Jetson for the OS and ROS. Assumption, not a measurement here: a desktop-less L4T
#: uses ~0.6-0.8 GiB after boot, a ROS 2 graph with a camera driver and a few nodes ~0.5 GiB, and the
#: firmware carve-outs make MemTotal a few hundred MiB smaller than the nominal size the presets use.
#: With the GNOME desktop running, add about 1 GiB (or switch it off: ``systemctl set-default
#: multi-user.target``).
JETSON_RESERVE_BYTES = 2 * GiB
#: Kept free on a CPU host (other processes, page cache for the checkpoint being read).
CPU_RESERVE_BYTES = 1 * GiB
#: Kept free on a discrete GPU (display, allocator fragmentation).
DISCRETE_RESERVE_BYTES = GiB // 4

#: Jetson Orin modules by their nominal memory size (GiB), all shared CPU/GPU memory.
PRESETS: Dict[str, DeviceProfile] = {
    name: DeviceProfile(name, size * GiB, shared=True, reserve_bytes=JETSON_RESERVE_BYTES)
    for name, size in (("orin-nano-4gb", 4), ("orin-nano-8gb", 8), ("orin-nx-8gb", 8),
                       ("orin-nx-16gb", 16), ("agx-orin-32gb", 32), ("agx-orin-64gb", 64))
}


def preset(name: str) -> DeviceProfile:
    """A named Jetson profile (``orin-nano-8gb``, ``orin-nx-16gb``, ``agx-orin-32gb``, ...)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown device profile {name!r}; known: {', '.join(PRESETS)}") from None


def detect_profile(device: str = "cpu") -> DeviceProfile:
    """The profile of this machine for ``device`` (``cpu``, ``cuda``, ``cuda:N``).

    On a Jetson (shared memory) the total is MemTotal whatever the device; on a discrete GPU it is the
    GPU's memory; on a CPU host it is MemTotal.
    """
    total, _available = memory_bytes()
    if is_jetson():
        name = board_model() or f"jetson {l4t_release()}"
        return DeviceProfile(name, total, shared=True, reserve_bytes=JETSON_RESERVE_BYTES)
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        gpu = cuda_device(index)
        if gpu:
            return DeviceProfile(gpu["gpu"], int(gpu["gpu_memory_bytes"]), shared=False,
                                 reserve_bytes=DISCRETE_RESERVE_BYTES)
    return DeviceProfile(f"cpu ({platform.machine()})", total, shared=True,
                         reserve_bytes=CPU_RESERVE_BYTES)


def available_now() -> Optional[int]:
    """MemAvailable right now (bytes), or None when unknown: what a build on this host may use."""
    _total, available = memory_bytes()
    return available or None
