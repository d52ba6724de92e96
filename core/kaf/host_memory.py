"""How much RAM the system can give this process now (no torch import: the file readers use it too)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def available_ram_bytes() -> int | None:
    """MemAvailable (free plus reclaimable caches) on Linux; the system's free pages elsewhere; None when
    the system does not say (Windows), so callers let the allocation itself report a shortage."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc/self/status on
    Linux. The peak is the program's own; ru_maxrss would also count the process that started it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field} line")


def peak_resident_bytes() -> int:
    """The most RAM this program has held; ru_maxrss where /proc is missing (macOS counts bytes)."""
    with contextlib.suppress(OSError):
        return resident_bytes("VmHWM")
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
