"""The device to train and generate on (CUDA, then Apple MPS, then the CPU) and the precision it runs at.

Models floor: imports cli only.
"""

from __future__ import annotations

from tuning.cli import UserError

DEVICE = "auto"  # the default: CUDA, then Apple MPS, then the CPU


class DeviceError(UserError):
    """A device or precision that this machine doesn't have, reported without a traceback."""


def get_device(requested: str = DEVICE):
    """torch.device for `requested`; 'auto' picks CUDA, then MPS, then CPU."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is visible to PyTorch (is the CUDA build of torch installed?)")
    if requested == "mps" and not mps:
        raise DeviceError("--device mps: Apple MPS is not available on this machine")
    if requested not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"--device {requested!r}: choose auto, cuda, mps or cpu")
    return torch.device(requested)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 math (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:  # macOS, Windows: no cheap check, so stay with fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_capability(device) -> tuple[int, int]:
    """The CUDA GPU's compute capability, e.g. (7, 5) for a T4 and (8, 0) for an A100."""
    import torch

    return tuple(torch.cuda.get_device_capability(device))


def cuda_native_bf16(device) -> bool:
    """bf16 in hardware: Ampere (compute capability 8.0) and newer. torch.cuda.is_bf16_supported() also counts
    the slow emulated bf16 of a T4 or V100."""
    return cuda_capability(device) >= (8, 0)


def resolve_precision(precision: str, device) -> tuple[str, str]:
    """(precision, reason) with 'auto' resolved for `device` and explicit choices checked."""
    kind = getattr(device, "type", device)
    if precision == "auto":
        if kind == "cuda":
            major, minor = cuda_capability(device)
            if cuda_native_bf16(device):
                return "bf16", f"CUDA GPU with native bf16 (compute capability {major}.{minor})"
            return "fp16", f"CUDA GPU without native bf16 (compute capability {major}.{minor}): fp16 with loss scaling"
        if kind == "mps":
            return "fp32", "Apple MPS: mixed precision training is not reliable there"
        if cpu_supports_bf16():
            return "bf16", "CPU with native bf16 (AVX512-BF16/AMX): bf16 autocast"
        return "fp32", "CPU without native bf16: fp32"
    if precision == "fp16" and kind != "cuda":
        raise DeviceError(f"--precision fp16 needs a CUDA GPU (device is {kind}); use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not cuda_native_bf16(device):
        major, minor = cuda_capability(device)
        raise DeviceError(f"--precision bf16: this GPU (compute capability {major}.{minor}) has no native bf16 "
                         "and would emulate it slowly; use fp16")
    return precision, "set explicitly"
