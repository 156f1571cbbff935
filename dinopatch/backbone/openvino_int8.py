"""OpenVINO int8: the fp32 export quantised by NNCF, calibrated on a model's nominal frames, cached by its hash.

Post-training quantisation needs activations to calibrate on, so this graph
belongs to one model: it is made when the model's engine is measured
(:mod:`dinopatch.engine_choice`, from the golden set's good frames) and
written once as OpenVINO IR (``.xml`` + ``.bin``) under
``$DINOPATCH_CACHE/openvino_int8``, named by the SHA-256 of both files.  The
engine choice records that hash; a later load reads the IR only when its
bytes hash to it.  Needs ``nncf`` only to make the graph, not to run it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from .specs import preprocess
from .weights import cache_dir

# NNCF sends usage telemetry to Google Analytics unless told not to, from a process it forks on a worker
# thread: a line PC fitting a model must not phone out, and a fork from a thread is unsafe beside the
# stages' threads and numba's TBB pool.  NNCF reads this variable once, at its first import, and only to
# turn its telemetry off; a value the user set is left alone.
os.environ.setdefault("NNCF_CI", "1")


def folder() -> Path:
    return cache_dir() / "openvino_int8"


def ir_sha256(xml: Path) -> str:
    """SHA-256 of an IR's ``.xml`` then its ``.bin``."""
    h = hashlib.sha256()
    for path in (xml, xml.with_suffix(".bin")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def quantize(model, frames: np.ndarray, positions: np.ndarray, image_size: int, mean, std) -> tuple[Path, str]:
    """Quantise the fp32 OpenVINO ``model`` on canonical ``frames`` ``[N, S, S, 3]`` (at ``positions``) and cache it.

    Returns:
        the cached ``.xml`` and its hash (:func:`ir_sha256`).
    """
    import nncf
    import openvino as ov

    x = preprocess(frames, image_size, mean, std)
    items = [{"images": x[i:i + 1], "positions": positions} for i in range(len(x))]
    # NNCF draws its own progress bars on stdout whatever the caller's progress setting, and wider than a
    # terminal of 100 columns; the engine measurement around this call says what is happening.
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(items))
    out = folder()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".quantize-") as tmp:
        staged = Path(tmp) / "model.xml"
        ov.save_model(quantized, str(staged), compress_to_fp16=False)
        digest = ir_sha256(staged)
        xml = out / f"{digest}.xml"
        os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(staged, xml)
    return xml, digest


def cached(sha256: str) -> Path:
    """The cached IR with hash ``sha256``, checked; ValueError where it is missing or its bytes differ."""
    xml = folder() / f"{sha256}.xml"
    if not (xml.is_file() and xml.with_suffix(".bin").is_file()):
        raise ValueError(f"the int8 OpenVINO graph {sha256[:16]}... this model was measured with is not in {folder()}: "
                         "it is made from the model's frames; run `dinopatch tune-engine -m MODEL` here")
    if ir_sha256(xml) != sha256:
        raise ValueError(f"{xml}: its bytes do not hash to the {sha256[:16]}... recorded with the model; refused")
    return xml
