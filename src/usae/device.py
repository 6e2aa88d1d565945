"""Which device a command runs on, and what that device multiplies fast."""

from __future__ import annotations

import os

import torch

from usae.errors import UsaeError


def resolve_device(device: str) -> torch.device:
    """``'auto'`` -> cuda if present, else cpu; any other torch device string as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsaeError(f"--device: unknown device {device!r}") from None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (then 3-4x faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (a GPU's, or this machine's RAM for the CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def require_memory(device: torch.device, need: int, what: str, fix: str) -> None:
    """One-line UsaeError when ``need`` bytes exceed ``device``'s memory (checked before allocating)."""
    have = memory_bytes(device)
    if have and need > have:
        raise UsaeError(
            f"{what} needs at least {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of {device.type}; {fix}"
        )
