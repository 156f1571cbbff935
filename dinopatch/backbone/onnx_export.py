"""DINOv2 patch tokens as an ONNX graph, checked against the torch reference.

The graph maps normalised images ``images [B, 3, S, S]`` (float32) and the flat
indices of the patches to run, ``positions [n]`` (int64, strictly increasing in
``[0, h * w)``; ``arange(h * w)`` for every patch), to their tokens
``tokens [B, n, D]`` (float32), batch and token axes dynamic, at one fixed
resolution: the position embedding is resampled once, in torch, when the model
is built at ``S``, so no bicubic-antialias interpolation (which exporters get
wrong or refuse) enters the graph.  ``layers > 1`` averages the last blocks'
normed tokens exactly as :class:`~dinopatch.backbone.TorchBackbone` does.
Attention is exported as ONNX Runtime's fused ``MultiHeadAttention``
(:mod:`.attention`), or, with ``portable=True``, as standard ONNX ops only
(MatMul, Softmax) for runtimes without ONNX Runtime's contrib ops (TensorRT,
others); the cache name and the metadata (``attention``) say which.

Precisions: ``fp32``; ``int8``, ONNX Runtime's dynamic quantisation of the
MatMul weights (a CPU speed-up on VNNI hardware); ``fp16``, float16 weights and
arithmetic with float32 input/output and LayerNormalization/Softmax kept in
float32 (fp16 overflows there), meant for GPUs.

Every export ends with ONNX Runtime run against torch on the same input; the
figures go into the file's metadata and an export beyond
:data:`CHECK_TOLERANCES` raises.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .._version import __version__
from .graph_file import ONNX_FORMAT, PRECISIONS, onnx_cache_path
from .specs import BACKBONES, preprocess
from .torch_engine import TorchBackbone
from .weights import RANDOM, weights_record_path

OPSET = 17
# precision -> (max |onnx - torch| / max |torch|, min mean cosine of the tokens); None: not checked.
CHECK_TOLERANCES = {"fp32": (1e-4, None), "fp16": (1e-2, 0.999), "int8": (None, 0.99)}
# Kept in float32 by the fp16 conversion, on top of onnxruntime's default list.
FP16_BLOCK_LIST = ["LayerNormalization", "Softmax"]


def export_onnx(name: str = "dinov2_vits14", weights="pretrained", image_size: int = 448, layers: int = 1,
                precision: str = "fp32", out: str | os.PathLike | None = None, seed: int = 0,
                fingerprint: str | None = None, portable: bool = False) -> Path:
    """Export a backbone configuration to ONNX.

    Args:
        name: a key of :data:`dinopatch.backbone.BACKBONES`.
        weights: ``"pretrained"``, ``"random"`` or a checkpoint path.
        image_size: input side in pixels, a multiple of the patch size.
        layers: mean of the last ``layers`` blocks.
        precision: ``"fp32"``, ``"int8"`` or ``"fp16"``.
        out: the ``.onnx`` file to write; default: the user cache, where
            ``engine="onnx"`` finds it.
        seed: for ``weights="random"``.
        fingerprint: refuse weights whose fingerprint differs from this.
        portable: standard ONNX ops only (attention as MatMul and Softmax).

    Returns:
        path of the written file.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {PRECISIONS}")
    backbone = TorchBackbone(name, weights, image_size, layers, seed, fingerprint=fingerprint)
    label = weights if weights in ("pretrained", *RANDOM) else Path(weights).name
    if out is None:
        out = onnx_cache_path(name, backbone.image_size, backbone.layers, precision, backbone.fingerprint, portable)
        # Exporting takes seconds to minutes: say why the first run pauses, and where the file goes.  Said
        # once the weights are loaded, so weights that cannot be had do not announce an export.
        print(f"dinopatch: exporting {name} at {backbone.image_size} px ({precision}) to ONNX once, into "
              f"{out.parent}", file=sys.stderr, flush=True)
    path = export_backbone(backbone, out, precision, weights_label=label, portable=portable)
    record = weights_record_path(name, weights, backbone.image_size, seed)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(backbone.fingerprint)
    return path


def export_backbone(backbone: TorchBackbone, out: str | os.PathLike, precision: str = "fp32",
                    weights_label: str = "", portable: bool = False) -> Path:
    """Export a built :class:`TorchBackbone` (its weights as they are) to ``out``.

    ``portable``: standard ONNX ops only, no ONNX Runtime contrib op.

    Returns:
        ``out`` as a Path, written atomically.
    """
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {PRECISIONS}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        graph = Path(tmp) / "fp32.onnx"
        _trace(backbone, graph, portable)
        if precision == "int8":
            model = _quantize_int8(graph, Path(tmp) / "int8.onnx")
        elif precision == "fp16":
            model = _to_fp16(onnx.load(str(graph)))
        else:
            model = onnx.load(str(graph))
        spec = backbone.spec
        meta = {
            "format": ONNX_FORMAT,
            "backbone": spec.name,
            "image_size": str(backbone.image_size),
            "patch_size": str(spec.patch_size),
            "embed_dim": str(spec.embed_dim),
            "mean": json.dumps(list(spec.mean)),
            "std": json.dumps(list(spec.std)),
            "layers": str(backbone.layers),
            "precision": precision,
            "attention": "portable" if portable else "fused",
            "weights": str(weights_label),
            "weights_fingerprint": backbone.fingerprint,
            "dinopatch_version": __version__,
        }
        staged = Path(tmp) / "model.onnx"
        _save(model, meta, staged)
        onnx.checker.check_model(str(staged), full_check=True)
        meta.update({f"check_{k}": f"{v:.3g}" for k, v in check_against_torch(staged, backbone, precision).items()})
        _save(model, meta, staged)
        os.replace(staged, out)
    return out


def _save(model, meta: dict, path: Path) -> None:
    import onnx

    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))


def _trace(backbone: TorchBackbone, path: Path, portable: bool = False) -> None:
    """fp32 graph of ``backbone.forward_tensor``, attention fused (see :mod:`.attention`) unless ``portable``.

    Portable attention is timm's own unfused arithmetic (``fused_attn`` off
    while tracing): MatMul, Softmax and the transposes around them.

    No offline pass of ``onnxruntime.transformers.optimizer`` follows: its
    SkipLayerNormalization/BiasGelu fusions were slower on the CPU than the
    session's own ORT_ENABLE_ALL (the figures are in the project's history).

    The TorchScript exporter: it works offline, is several times quicker than
    the dynamo exporter, and its graphs ran at least as fast.
    """
    import warnings

    import torch

    from .attention import fused_attention, unfused_attention

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = backbone.model

        def forward(self, images, positions):
            return backbone.forward_tensor(images, positions)

    sample = _check_input(backbone.image_size, batch=1, mean=backbone.spec.mean, std=backbone.spec.std)
    every = torch.arange(backbone.grid[0] * backbone.grid[1], device=backbone.device)
    with torch.no_grad(), warnings.catch_warnings(), \
            (unfused_attention if portable else fused_attention)(backbone.model):
        # timm asserts the input size in Python; the graph is for that one size anyway.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The legacy exporter is chosen on purpose (see above); its deprecation notices are not news.
        # The main one is attributed to this module (by its stack level), so it is matched by message.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(Tokens().eval(), (torch.from_numpy(sample).to(backbone.device), every), str(path),
                          input_names=["images", "positions"], output_names=["tokens"], opset_version=OPSET,
                          dynamo=False, dynamic_axes={"images": {0: "batch"}, "positions": {0: "patches"},
                                                      "tokens": {0: "batch", 1: "patches"}})


def _quantize_int8(src: Path, dst: Path):
    """Dynamic quantisation of the MatMul weights (activations quantised per call).

    Per output channel: with one scale per matrix its largest column sets the
    step for all; per channel keeps the tokens markedly closer to fp32 at no
    measurable cost in speed.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The exporter leaves some intermediate types to inference; declare float.
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return onnx.load(str(dst))


def _to_fp16(model):
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_BLOCK_LIST)
    # The converter appends the input casts at the end; the checker wants topological order.
    OnnxModel(model).topological_sort()
    return model


def _check_input(image_size: int, batch: int, mean, std, seed: int = 0) -> np.ndarray:
    """Normalised random-texture images, smoothed so they look less like pure noise."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (batch, image_size // 8, image_size // 8, 3), dtype=np.uint8)
    images = np.stack([cv2.resize(im, (image_size, image_size), interpolation=cv2.INTER_LINEAR) for im in small])
    return preprocess(images, image_size, mean, std)


def check_against_torch(path: str | os.PathLike, backbone: TorchBackbone, precision: str, batch: int = 2) -> dict:
    """Run the export on ONNX Runtime (CPU) and torch on the same input; raise beyond tolerance.

    Checked on every patch and on every third one (the foreground-token path);
    the worse figures count.

    Returns:
        ``max_rel_error`` (max |onnx - torch| / max |torch|) and
        ``cosine`` (mean cosine similarity of the tokens).
    """
    import onnxruntime as ort
    import torch

    x = _check_input(backbone.image_size, batch, backbone.spec.mean, backbone.spec.std)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    every = np.arange(backbone.grid[0] * backbone.grid[1])
    errors, cosines = [], []
    for positions in (every, every[::3]):
        with torch.inference_mode():
            ref = backbone.forward_tensor(torch.from_numpy(x).to(backbone.device),
                                          torch.from_numpy(positions).to(backbone.device)).float().cpu().numpy()
        got = session.run(["tokens"], {"images": x, "positions": positions})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"{path}: ONNX Runtime gives tokens {got.shape}, torch {ref.shape}")
        errors.append(token_error(got, ref))
        cosines.append(token_cosine(got, ref))
    figures = {"max_rel_error": max(errors), "cosine": min(cosines)}
    max_rel, min_cos = CHECK_TOLERANCES[precision]
    if (max_rel is not None and not figures["max_rel_error"] <= max_rel) or (
            min_cos is not None and not figures["cosine"] >= min_cos):
        raise RuntimeError(f"{path}: {precision} export disagrees with torch: max relative error "
                           f"{figures['max_rel_error']:.2e} (limit {max_rel}), token cosine {figures['cosine']:.5f} "
                           f"(floor {min_cos})")
    return figures


def token_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def token_cosine(got: np.ndarray, ref: np.ndarray) -> float:
    """Mean cosine similarity of corresponding tokens (last axis)."""
    a = got.reshape(-1, got.shape[-1]).astype(np.float64)
    b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def main(argv: list[str] | None = None) -> int:
    """``python -m dinopatch export``: write an export and print its check figures."""


    p = argparse.ArgumentParser(prog="python -m dinopatch export", description="Export a DINOv2 backbone to ONNX.")
    p.add_argument("--backbone", default="dinov2_vits14", choices=sorted(BACKBONES))
    p.add_argument("--weights", default="pretrained", help="'pretrained', 'random' or a checkpoint path")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--layers", type=int, default=1, help="mean of the last LAYERS blocks")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--seed", type=int, default=0, help="for --weights random")
    p.add_argument("--portable", action="store_true",
                   help="standard ONNX ops only (attention as MatMul and Softmax), for runtimes without "
                        "ONNX Runtime's contrib ops, e.g. TensorRT")
    p.add_argument("-o", "--output", help="the .onnx file (default: the cache that engine='onnx' reads)")
    args = p.parse_args(argv)
    path = export_onnx(args.backbone, args.weights, args.image_size, args.layers, args.precision, args.output,
                       args.seed, portable=args.portable)
    import onnx

    meta = {m.key: m.value for m in onnx.load(str(path), load_external_data=False).metadata_props}
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {meta['backbone']} at {meta['image_size']} px, "
          f"layers {meta['layers']}, {meta['precision']}, {meta['attention']} attention; vs torch: max relative error "
          f"{meta['check_max_rel_error']}, token cosine {meta['check_cosine']}")
    return 0
