"""How much RAM the system can give this process now (no torch import: the file readers use it too)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path


def available_ram_bytes() -> int | None:
    """MemAvailable (free plus reclaimable caches) on Linux; the system's free pages elsewhere; None when
    the system does not say (Windows), so callers let the allocation itself report a shortage. Memory
    this process has freed is handed back first, so that it counts as available."""
    release_freed_heap()
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def release_freed_heap() -> None:
    """Hand the memory this process has freed back to the system (glibc's malloc_trim; nothing elsewhere).

    glibc keeps freed blocks for reuse: after a paper-preset training step on the CPU the process still
    held 5 GB (measured, 2026-11-30), which MemAvailable counts as used, so a second fine-tune in the same
    process was refused for want of memory it already had, and the system went short of it meanwhile."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
