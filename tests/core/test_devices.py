"""Device choice, mixed precision and memory errors; GPUs are simulated by monkeypatching torch."""

from __future__ import annotations

import contextlib
import platform
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kaf.runtime import devices, host_memory
from kaf.runtime.devices import (
    autocast,
    autocast_dtype,
    available_devices,
    check_memory,
    cpu_warning,
    device_summary,
    format_bytes,
    free_memory_bytes,
    grad_scaler,
    is_out_of_memory,
    out_of_memory_error,
    resolve_device,
)
from kaf.runtime.errors import DeviceError

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
GIB = 2**30


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answers on a CPU-only test machine and on one with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One Hopper GPU, as far as the functions under test can see; nothing is allocated on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Fake")
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: GIB // 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.version, "hip", None)


# --- choosing a device -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_gpu")
def test_without_gpu_auto_and_cpu_give_the_cpu() -> None:
    assert resolve_device() == CPU
    assert resolve_device("auto") == CPU
    assert resolve_device(" CPU ") == CPU
    assert [name for name, _ in available_devices()] == ["auto", "cpu"]
    assert available_devices()[0][1] == "Auto (cpu)"


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_unavailable_gpu_names_the_available_devices(name: str) -> None:
    with pytest.raises(
        DeviceError, match=f"Device '{name}' is not available: .*Available devices: auto, cpu\\."
    ):
        resolve_device(name)


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("name", ["banana", "cuda:x", "cuda:-1", "gpu", ""])
def test_unknown_device_is_refused(name: str) -> None:
    with pytest.raises(DeviceError, match=f"Unknown device '{name}'. Available devices: auto, cpu"):
        resolve_device(name)


@pytest.mark.usefixtures("fake_gpu")
def test_with_one_gpu_auto_picks_it() -> None:
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda") == CUDA
    assert resolve_device("CUDA:0") == CUDA
    assert available_devices()[:2] == [("auto", "Auto (cuda:0)"), ("cuda:0", "cuda:0 - NVIDIA Fake (80 GB)")]
    assert available_devices()[-1][0] == "cpu"


@pytest.mark.usefixtures("fake_gpu")
def test_a_second_gpu_that_does_not_exist_is_refused() -> None:
    with pytest.raises(
        DeviceError, match=r"'cuda:1' is not available: PyTorch sees 1 CUDA GPU\. .* auto, cuda:0, cpu"
    ):
        resolve_device("cuda:1")


def test_mps_is_picked_when_there_is_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)

    assert resolve_device("auto") == torch.device("mps")
    assert ("mps", "Apple GPU (MPS)") in available_devices()


# --- mixed precision ---------------------------------------------------------------------------------------


def test_cpu_runs_in_full_precision_without_loss_scaling() -> None:
    assert autocast_dtype(CPU) is None
    assert isinstance(autocast(CPU), contextlib.nullcontext)
    assert not grad_scaler(CPU).is_enabled()


@pytest.mark.parametrize(
    ("capability", "dtype"), [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)]
)
def test_cuda_uses_bfloat16_where_the_gpu_supports_it(monkeypatch, capability, dtype) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    assert autocast_dtype(CUDA) == dtype


# --- memory ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 GB"),
        MemoryError("Unable to allocate 8.0 GiB for an array"),
    ],
)
def test_out_of_memory_errors_are_recognised(error: BaseException) -> None:
    assert is_out_of_memory(error)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        ValueError("out of memory"),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_taken_for_out_of_memory(error: BaseException) -> None:
    assert not is_out_of_memory(error)


def test_out_of_memory_error_suggests_what_to_change() -> None:
    message = str(out_of_memory_error(CUDA, "fine-tuning"))

    assert message.startswith("Ran out of memory on cuda:0 while fine-tuning.")
    for advice in ("'interactive' preset", "smaller batch size or crop", "the CPU"):
        assert advice in message


def test_check_memory_refuses_an_absurd_request_with_both_sizes() -> None:
    with pytest.raises(DeviceError) as caught:
        check_memory(CPU, 1 << 60, "predicting")

    message = str(caught.value)
    assert re.search(
        r"predicting: it needs about 1,073,741,824\.0 GB, and [\d,.]+ [MG]B can be used "
        r"\(90% of the [\d,.]+ [MG]B free",
        message,
    )
    assert "smaller batch size" in message


def test_check_memory_passes_a_small_request() -> None:
    check_memory(CPU, 1 << 20, "predicting")


def test_cpu_memory_falls_back_to_sysconf_without_proc_meminfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "Path", lambda _: Path("/nonexistent/meminfo"))
    monkeypatch.setattr(
        host_memory.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name]
    )

    assert free_memory_bytes(CPU) == 4_096_000


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_this_process_freed_counts_as_available() -> None:
    """glibc keeps freed heap blocks for reuse, and MemAvailable counts them as used: a second training
    run in one process was refused for memory the first had freed. Holes of 100 KB blocks (below glibc's
    mmap threshold, so on the heap) stay resident until available_ram_bytes hands them back."""
    blocks = [np.ones(100_000 // 8) for _ in range(2000)]
    del blocks[::2]  # 100 MB of holes between blocks still in use
    holding = host_memory.resident_bytes()

    host_memory.available_ram_bytes()

    assert holding - host_memory.resident_bytes() > 50 * 2**20


def test_cpu_memory_is_unlimited_when_the_system_does_not_say(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "available_ram_bytes", lambda: None)

    check_memory(CPU, 1 << 50, "predicting")  # the allocation itself will report a real shortage


@pytest.mark.usefixtures("fake_gpu")
def test_cuda_free_memory_counts_what_pytorch_has_cached() -> None:
    assert free_memory_bytes(CUDA) == 2 * GIB + GIB // 2
    check_memory(CUDA, 2 * GIB, "fine-tuning")
    # More than the 90 % of the free memory that may be used, though less than all of it: the message says so.
    refusal = r"needs about 2\.3 GB, and 2\.2 GB can be used \(90% of the 2\.5 GB free, .*the CPU"
    with pytest.raises(DeviceError, match=refusal):
        check_memory(CUDA, int(2.3 * GIB), "fine-tuning")


def test_format_bytes_uses_megabytes_below_a_gigabyte() -> None:
    assert format_bytes(512 * 2**20) == "512 MB"
    assert format_bytes(3 * GIB) == "3.0 GB"


# --- messages ----------------------------------------------------------------------------------------------


def test_cpu_warning_only_on_the_cpu() -> None:
    warning = cpu_warning(CPU)
    # A measured figure (BENCHMARKS.md's interactive loop), and where the job's own estimate comes from.
    assert warning.startswith("Running on the CPU") and "79 s" in warning and "step times" in warning
    assert "about a minute" not in warning
    assert cpu_warning(CUDA) is None
    assert cpu_warning(torch.device("mps")) is None


def test_device_summary_names_device_and_versions(fake_gpu) -> None:
    assert device_summary(CPU) == f"cpu ({torch.get_num_threads()} threads, torch {torch.__version__})"
    assert device_summary(CUDA) == f"cuda:0 NVIDIA Fake, torch {torch.__version__}, CUDA 12.4"
