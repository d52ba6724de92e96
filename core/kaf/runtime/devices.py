"""Choosing the compute device, mixed precision on GPUs, and memory problems reported in plain words."""

from __future__ import annotations

import contextlib
import re

import torch

from kaf.runtime.errors import DeviceError
from kaf.runtime.host_memory import available_ram_bytes

AUTO = "auto"
CUDA_NAME = re.compile(r"cuda(?::(\d+))?")
MEMORY_MARGIN = 0.9  # leave 10 % of the free memory for fragmentation and other programs
GIB = 2**30
MIB = 2**20
# MPS shares the Mac's unified memory, whose free amount PyTorch cannot report, and macOS swaps rather
# than failing; so MPS is treated as having room and a real shortage surfaces as an out-of-memory error.
UNKNOWN_FREE_BYTES = 2**62
# Figures from BENCHMARKS.md ("Speed against the goals"); a job's own estimate comes from its step times.
CPU_WARNING = (
    "Running on the CPU: on a 2-core CPU the 'interactive' preset fine-tuned 150 steps on two slices and "
    "segmented the volume in 79 s; a CUDA GPU is faster. The time left is estimated from this machine's "
    "step times as a job runs."
)
OUT_OF_MEMORY_MESSAGES = ("out of memory", "DefaultCPUAllocator: can't allocate memory")


def available_devices() -> list[tuple[str, str]]:
    """(name, label) pairs for a device menu: auto first, then each GPU, then the CPU."""
    devices = [(AUTO, f"Auto ({resolve_device(AUTO)})")]
    for index in range(_cuda_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        devices.append(
            (f"cuda:{index}", f"cuda:{index} - {torch.cuda.get_device_name(index)} ({total / GIB:.0f} GB)")
        )
    if _mps_available():
        devices.append(("mps", "Apple GPU (MPS)"))
    devices.append(("cpu", f"CPU ({torch.get_num_threads()} threads)"))
    return devices


def resolve_device(name: str = AUTO) -> torch.device:
    """The device for a user's choice: "auto" (CUDA, then MPS, then CPU), "cpu", "mps", "cuda" or "cuda:N"."""
    name = name.strip().lower()
    if name == AUTO:
        if _cuda_count():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise _unavailable(name, "this computer has no Apple GPU that PyTorch can use")
        return torch.device("mps")
    cuda = CUDA_NAME.fullmatch(name)
    if cuda is None:
        raise DeviceError(f"Unknown device '{name}'. {_choices()}")
    index = int(cuda.group(1) or 0)
    if index >= _cuda_count():
        raise _unavailable(name, _cuda_problem())
    return torch.device("cuda", index)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    return torch.backends.mps.is_available()


def _cuda_problem() -> str:
    if torch.version.cuda is None and torch.version.hip is None:
        return "this PyTorch was built without CUDA support (install a CUDA build of PyTorch to use a GPU)"
    count = _cuda_count()
    return f"PyTorch sees {count} CUDA GPU{'' if count == 1 else 's'}"


def _unavailable(name: str, reason: str) -> DeviceError:
    return DeviceError(f"Device '{name}' is not available: {reason}. {_choices()}")


def _choices() -> str:
    return f"Available devices: {', '.join(name for name, _ in available_devices())}."


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type on CUDA: bfloat16 where the GPU computes it natively (Ampere and later)."""
    if device.type != "cuda":
        return None
    major, _minor = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA; full precision elsewhere, where autocast gains little or is unsupported."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling, needed only with float16, whose small range lets gradients underflow to zero."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device) == torch.float16)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


def out_of_memory_error(device: torch.device, what: str) -> DeviceError:
    return DeviceError(f"Ran out of memory on {device} while {what}. {_memory_advice(device)}")


def _memory_advice(device: torch.device) -> str:
    if device.type == "cpu":
        return (
            "Try the smaller 'interactive' preset, a smaller batch size or crop, or close other programs to "
            "free memory."
        )
    return "Try the smaller 'interactive' preset, a smaller batch size or crop, or the CPU (device 'cpu')."


def cpu_warning(device: torch.device) -> str | None:
    return CPU_WARNING if device.type == "cpu" else None


def free_memory_bytes(device: torch.device) -> int:
    """Memory that a new allocation on `device` can use now."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory PyTorch has reserved but not handed out is free to it, though the driver counts it as used.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    if device.type == "cpu":
        available = available_ram_bytes()
        # Without a number, let the allocation itself report a shortage.
        return UNKNOWN_FREE_BYTES if available is None else available
    return UNKNOWN_FREE_BYTES


def check_memory(device: torch.device, needed_bytes: int, what: str) -> None:
    """Refuse, before allocating, work that would not fit: failing late can leave the GPU in a bad state."""
    free = free_memory_bytes(device)
    usable = int(free * MEMORY_MARGIN)
    if needed_bytes > usable:
        raise DeviceError(
            f"Not enough memory on {device} for {what}: it needs about {format_bytes(needed_bytes)}, and "
            f"{format_bytes(usable)} can be used ({MEMORY_MARGIN:.0%} of the {format_bytes(free)} free, "
            f"the rest left for fragmentation and other programs). {_memory_advice(device)}"
        )


def format_bytes(count: int) -> str:
    """Binary units, as GPU memory is quoted: 80 GB here is 80 * 2**30 bytes."""
    if count >= GIB:
        return f"{count / GIB:,.1f} GB"
    return f"{count / MIB:,.0f} MB"


def device_summary(device: torch.device) -> str:
    """One line for logs and bug reports: the device, its name and the software versions."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        toolkit = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"cuda:{index} {torch.cuda.get_device_name(index)}, torch {torch.__version__}, {toolkit}"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, torch {torch.__version__})"
    return f"{device} (torch {torch.__version__})"
