"""Which device a command runs on, and what that device multiplies fast."""

from __future__ import annotations

import dataclasses
import os

import torch

from usae.errors import UsaeError


def resolve_device(device: str) -> torch.device:
    """``'auto'`` -> cuda if present, else cpu; any other torch device string as given, checked to
    exist here (:func:`require_available`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsaeError(f"--device: unknown device {device!r}") from None
    require_available(dev, device)
    return dev


def require_available(dev: torch.device, given: str) -> None:
    """One-line UsaeError unless ``dev`` can run a command on this machine.

    torch only finds out at the first tensor, as a traceback (no NVIDIA driver, no MPS build) or
    a NotImplementedError much later ('meta' tensors hold no data).
    """
    fix = "use --device cpu or auto"
    if dev.type == "meta":
        raise UsaeError(f"--device {given}: the 'meta' device holds no data, so nothing can be computed on it; {fix}")
    if dev.type == "cpu":
        return
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsaeError(f"--device {given}: no {dev.type} device on this machine; {fix}")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise UsaeError(f"--device {given}: this machine has {count} {dev.type} device(s), numbered from 0; {fix}")


def check_devices(cfg: object) -> None:
    """Check every ``device`` field of a command's config (nested dataclasses too) before it runs:
    a missing device is one line, at once, in every command."""
    if not dataclasses.is_dataclass(cfg):
        return
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name == "device" and isinstance(value, str):
            resolve_device(value)
        elif dataclasses.is_dataclass(value):
            check_devices(value)


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
