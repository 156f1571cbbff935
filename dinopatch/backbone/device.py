"""Where an engine runs: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, and a GPU asked for that is not there.

A GPU asked for by name that cannot be used is an error at once, naming the
device and why; it never becomes a silent CPU run.  ``"auto"`` takes the first
GPU where the engine can use one, else the CPU, and says which in a one-line
log (logger ``dinopatch``) and in the engine's ``device`` attribute.
"""
from __future__ import annotations

import logging

log = logging.getLogger("dinopatch")

CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


class DeviceUnavailableError(RuntimeError):
    """A device was asked for by name and this machine (or this runtime) cannot run on it."""


def parse_device(device: str) -> tuple[str, int | None]:
    """``"auto"`` / ``"cpu"`` -> ``(kind, None)``; ``"cuda"`` -> ``("cuda", 0)``; ``"cuda:N"`` -> ``("cuda", N)``."""
    text = str(device).strip().lower()
    if text in ("auto", "cpu"):
        return text, None
    kind, colon, index = text.partition(":")
    if kind == "cuda" and (not colon or index.isdigit()):
        return "cuda", int(index or 0)
    raise ValueError(f"device {device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _chosen(device: str, engine: str) -> str:
    log.info("dinopatch: device='auto' runs the %s engine on %s", engine, device)
    return device


def torch_device(device: str = "auto") -> str:
    """The torch device string for ``device``; DeviceUnavailableError for a GPU torch cannot use."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return "cpu"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "auto":
        return _chosen("cuda:0" if count else "cpu", "torch")
    if index >= count:
        why = ("this torch build has no CUDA support" if not torch.backends.cuda.is_built()
               else f"torch sees {count} CUDA GPU(s)")
        raise DeviceUnavailableError(f"device {device!r} asked for, but {why}; use device='cpu' or 'auto'")
    return f"cuda:{index}"


def onnx_providers(device: str, available: list[str]) -> tuple[str, list]:
    """The device and the ONNX Runtime providers (with options) to ask for.

    On a GPU: the device id, and an exhaustive cuDNN algorithm search (once per
    session; the input shape is fixed but for the batch, so the search pays
    for itself); the CPU provider stays last for the ops CUDA lacks.

    Raises:
        DeviceUnavailableError: a GPU asked for by name and onnxruntime has no
            CUDA provider (the CPU package is installed, not onnxruntime-gpu).
    """
    kind, index = parse_device(device)
    if kind == "auto":
        kind, index = ("cuda", 0) if CUDA_PROVIDER in available else ("cpu", None)
        _chosen(f"cuda:{index}" if kind == "cuda" else "cpu", "onnx")
    if kind == "cpu":
        return "cpu", [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        raise DeviceUnavailableError(
            f"device {device!r} asked for, but this onnxruntime has no {CUDA_PROVIDER} (providers: "
            f"{', '.join(available)}): install onnxruntime-gpu (the [gpu] extra) instead of onnxruntime, "
            f"or use device='cpu'")
    options = {"device_id": index, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    return f"cuda:{index}", [(CUDA_PROVIDER, options), CPU_PROVIDER]


def cpu_only(device: str, engine: str) -> str:
    """``"cpu"`` for an engine that runs on the CPU only; DeviceUnavailableError for a GPU asked by name."""
    kind, _ = parse_device(device)
    if kind == "cuda":
        raise DeviceUnavailableError(f"device {device!r} asked for, but the {engine} engine runs on the CPU "
                                     f"only; use engine='onnx' or 'torch' on a GPU")
    return "cpu"


def require(device: str) -> None:
    """Raise at once when a GPU asked for by name is usable by no installed engine; nothing for cpu or auto."""
    import importlib.util

    kind, _ = parse_device(device)
    if kind != "cuda":
        return
    reasons = []
    if importlib.util.find_spec("torch") is not None:
        try:
            torch_device(device)
            return
        except DeviceUnavailableError as e:
            reasons.append(str(e).split("; use")[0].split("but ")[-1])
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        if CUDA_PROVIDER in ort.get_available_providers():
            return  # onnxruntime-gpu: its session reports at start-up a GPU it cannot open
        reasons.append("onnxruntime has no CUDA provider (the [gpu] extra installs onnxruntime-gpu)")
    raise DeviceUnavailableError(f"device {device!r} asked for, but no CUDA GPU is usable here: "
                                 f"{'; '.join(reasons) or 'neither torch nor onnxruntime is installed'}; "
                                 f"use device='cpu' or 'auto'")
