"""What the machine offers a run, detected rather than guessed: native bfloat16 arithmetic, and
the C allocator's handling of large temporaries.

- :func:`native_bf16` tells whether a device computes in bfloat16 natively (a CPU with
  AVX512-BF16 or AMX, a CUDA device that supports it);
  :func:`resolve_precision` turns an experiment's ``precision`` (``"auto"`` included) into the
  one a run uses, with the reason.
- :func:`configure_allocator` makes glibc keep freed memory in the process's heap instead of
  returning every large block to the kernel, so that the next training step does not
  page-fault the same temporaries in again (docs/benchmarks.md, "The shapes step on a CPU").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import NamedTuple

import torch

__all__ = [
    "AllocatorSetting",
    "PrecisionChoice",
    "configure_allocator",
    "native_bf16",
    "resolve_precision",
]


class PrecisionChoice(NamedTuple):
    """The precision a run asked for, the one it uses, and why."""

    requested: str
    used: str
    reason: str


def _cpu_bf16() -> str | None:
    """The CPU feature that gives native bfloat16, or None."""
    for feature, name in (
        ("_is_avx512_bf16_supported", "AVX512-BF16"),
        ("_is_amx_tile_supported", "AMX"),
    ):
        detect = getattr(torch.cpu, feature, None)
        if detect is not None and detect():
            return name
    return None


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # an older torch, without emulation to leave out
            return bool(torch.cuda.is_bf16_supported())


def _bf16_reason(device: torch.device) -> tuple[bool, str]:
    if device.type == "cpu":
        feature = _cpu_bf16()
        if feature is not None:
            return True, f"the CPU has {feature}"
        return False, "the CPU has neither AVX512-BF16 nor AMX"
    if device.type == "cuda":
        if _cuda_bf16(device):
            return True, f"{device} supports bf16"
        return False, f"{device} has no native bf16"
    return False, f"no bf16 detection for {device.type} devices"


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CPU with AVX512-BF16 or AMX tiles,
    or a CUDA device for which ``torch.cuda.is_bf16_supported`` holds (without emulation).
    Anything else: False."""
    return _bf16_reason(torch.device(device))[0]


def resolve_precision(precision: str, device: str | torch.device) -> PrecisionChoice:
    """The precision a run on ``device`` uses for an experiment's ``precision``: ``"auto"`` is
    ``"bf16"`` where :func:`native_bf16` holds and ``"fp32"`` elsewhere; any other value is
    used as it is."""
    if precision != "auto":
        return PrecisionChoice(precision, precision, "set in the experiment")
    native, why = _bf16_reason(torch.device(device))
    return PrecisionChoice(precision, "bf16" if native else "fp32", why)


# --- the C allocator ------------------------------------------------------------------------------


class AllocatorSetting(NamedTuple):
    """Whether :func:`configure_allocator` changed the allocator, and why (not)."""

    configured: bool
    reason: str


_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# blocks up to the threshold come from the heap; some glibc versions refuse a threshold above
# HEAP_MAX_SIZE / 2 (32 MiB on 64-bit machines) through mallopt, so that is the fallback
_MMAP_THRESHOLDS = (2**30, 32 * 2**20)
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never give the heap's top back, in effect
_TOP_PAD = 256 * 2**20  # grow the heap in large steps (address space; pages are touched on use)

_setting: AllocatorSetting | None = None


def configure_allocator() -> AllocatorSetting:
    """Make glibc's malloc keep large freed blocks in the heap: blocks up to 1 GiB (32 MiB
    where glibc refuses more) come from the heap rather than a fresh ``mmap`` each, and the
    heap's free top is not returned to the kernel, so a training step reuses the pages of the
    step before instead of faulting in (and zeroing) new ones. Memory the process freed stays
    its own (its peak, in effect) until it exits.

    Process-wide and permanent; idempotent (the first call's result is returned again).
    Elsewhere than Linux with glibc it does nothing and says why (``configured`` False)."""
    global _setting
    if _setting is None:
        _setting = _configure()
    return _setting


def _configure() -> AllocatorSetting:
    if platform.system() != "Linux":
        return AllocatorSetting(False, f"not Linux ({platform.system()})")
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return AllocatorSetting(False, f"the C library is not glibc ({libc_name or 'unknown'})")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return AllocatorSetting(False, f"glibc's mallopt is not reachable ({e})")
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    threshold = next((t for t in _MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, t) == 1), None)
    if threshold is None:
        return AllocatorSetting(False, "mallopt refused M_MMAP_THRESHOLD")
    refused = [
        name
        for name, param, value in (
            ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            ("M_TOP_PAD", _M_TOP_PAD, _TOP_PAD),
        )
        if mallopt(param, value) != 1
    ]
    if refused:
        return AllocatorSetting(False, f"mallopt refused {', '.join(refused)}")
    return AllocatorSetting(
        True,
        f"glibc mallopt: mmap threshold {threshold >> 20} MiB, trim threshold "
        f"{_TRIM_THRESHOLD >> 20} MiB, top pad {_TOP_PAD >> 20} MiB",
    )
