"""DINOv2 and DINOv3 weights: from the hub through timm, a local checkpoint, or seeded random; and their fingerprint.

Weights, in the order people reach for them:

* ``"pretrained"``: DINOv2 (LVD-142M) through timm from the hub.  Without a
  route to the hub and no cached copy this fails at once with
  :class:`WeightsUnavailableError`; it never falls back silently.
* a path to a local checkpoint: Meta's ``.pth`` (e.g. ``dinov2_vits14_pretrain.pth``)
  or timm's ``.safetensors``.  Position embeddings are resampled to ``image_size``.
* ``"random"``: timm's initialisation under ``torch.manual_seed(seed)``.  DINOv2's
  LayerScale starts at 1e-5, so these blocks are near the identity.
* ``"random-blocks"``: the same with every LayerScale at 1, so that every block
  matters (tests and offline quality runs); :func:`write_blocks_matter_checkpoint`
  writes them as a checkpoint (``python -m dinopatch weights --random-blocks``).

Checkpoints are read as data (``weights_only=True`` or safetensors), never executed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import socket
from pathlib import Path

from .specs import BackboneSpec, get_spec

RANDOM = ("random", "random-blocks")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had on this machine."""


def cache_dir() -> Path:
    """Where exports are cached: ``$DINOPATCH_CACHE`` or ``~/.cache/dinopatch``."""
    return Path(os.environ.get("DINOPATCH_CACHE") or Path.home() / ".cache" / "dinopatch")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_checkpoint(path: Path) -> dict:
    """A state dict from a file, never executing code from it."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def _load_state_dict(model, sd: dict, source: str) -> None:
    """Load Meta- or timm-format DINOv2 / DINOv3 weights (resampling DINOv2's position embeddings).

    The key mapping is the one timm keeps beside the model's class (``vision_transformer`` for
    DINOv2, ``eva`` for DINOv3).
    """
    import importlib

    checkpoint_filter_fn = importlib.import_module(type(model).__module__).checkpoint_filter_fn
    sd = {k.removeprefix("backbone.").removeprefix("module."): v for k, v in sd.items()}
    sd = checkpoint_filter_fn(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {type(model).__name__} "
            f"(missing {sorted(missing)[:5]}..., unexpected {sorted(unexpected)[:5]}...)"
        )


def build_model(spec: BackboneSpec, weights: str | os.PathLike, image_size: int, seed: int = 0):
    """The timm DINOv2 model for ``spec`` at ``image_size``, weights loaded, in eval mode."""
    import timm

    kwargs = dict(img_size=image_size, num_classes=0)
    if weights == "pretrained":
        if not _hub_reachable():
            cached = _cached_hub_file(spec)
            if cached is None:
                raise WeightsUnavailableError(
                    f"pretrained {spec.name} weights cannot be downloaded (no route to the hub) "
                    "and are not cached; pass weights='random' or weights='/path/to/checkpoint' "
                    "(Meta .pth or timm .safetensors)"
                )
            weights = cached
        else:
            return timm.create_model(spec.hub_tag, pretrained=True, **kwargs).eval()
    if weights == "random":
        return _random_model(spec, seed, blocks_matter=False, **kwargs).eval()
    if weights == "random-blocks":  # made like the checkpoint of write_blocks_matter_checkpoint, read like it
        sd, source = _random_model(spec, seed, blocks_matter=True, num_classes=0).state_dict(), weights
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights {str(weights)!r}: no such checkpoint file; or use 'pretrained', "
                                    "'random' or 'random-blocks'")
        sd, source = _read_checkpoint(path), str(path)
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    _load_state_dict(model, sd, source)
    return model.eval()


def _random_model(spec: BackboneSpec, seed: int, blocks_matter: bool, **kwargs):
    """timm's seeded random init; with ``blocks_matter``, every LayerScale gamma at 1.

    timm's init sets DINOv2's LayerScale to 1e-5, which leaves the blocks near
    the identity (tokens with and without them have cosine 0.99999999996): a
    check on those weights cannot see a bug in attention or the MLP.  With
    gammas at 1, random as they are, every block matters.
    """
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if blocks_matter:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):  # DINOv2's names, DINOv3's
                    p.fill_(1.0)
    return model


def write_blocks_matter_checkpoint(spec: BackboneSpec, path: str | os.PathLike, seed: int = 0) -> Path:
    """``weights="random-blocks"`` at timm's default size, written to ``path`` as timm .safetensors.

    The file loads through the checkpoint reader like a user's, at any image size.
    """
    from safetensors.torch import save_file

    model = _random_model(spec, seed, blocks_matter=True, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def _cached_hub_file(spec: BackboneSpec) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(f"timm/{spec.hub_tag}", "model.safetensors")
    return Path(hit) if isinstance(hit, str) else None


def weights_fingerprint(model) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes).

    Model files and ONNX exports record it, so that features from other
    weights are never mixed with a fitted bank silently.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        a = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def weights_record_path(name: str, weights, image_size: int, seed: int = 0) -> Path | None:
    """The cache file that remembers the fingerprint of ``weights``, found without loading them.

    The key is what identifies the weights cheaply (seed, hub tag, or file path,
    size and time), with the torch and timm versions, since random
    initialisation and position-embedding resampling depend on them.  None
    where torch is not installed: there the fingerprint comes from a model file.
    """
    try:
        versions = {p: importlib.metadata.version(p) for p in ("torch", "timm")}
    except importlib.metadata.PackageNotFoundError:
        return None
    if weights in RANDOM:
        ident = {"seed": int(seed)} if weights == "random" else {"seed": int(seed), "init": weights}
    elif weights == "pretrained":
        ident = {"hub": get_spec(name).hub_tag}
    else:
        path = Path(weights).resolve()
        if not path.is_file():
            return None
        st = path.stat()
        ident = {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = json.dumps(dict(ident, backbone=name, image_size=int(image_size), **versions), sort_keys=True)
    return cache_dir() / "onnx" / "weights" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.txt"


