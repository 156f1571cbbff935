"""The reference engine: timm DINOv2 (or DINOv3) in eager torch.

It runs either every patch (timm's ``forward_intermediates``) or only the
patches at given flat ``positions`` (with the class and register tokens): the
patch embeddings and their position embeddings are gathered there before the
blocks, so attention sees only those tokens.  That path is what the ONNX export
traces, with the positions as a graph input.
"""
from __future__ import annotations

import numpy as np

from .device import torch_device
from .specs import check_image_size, check_positions, get_spec, preprocess
from .weights import build_model, weights_fingerprint

# precision -> autocast dtype (None: plain float32).
AUTOCAST = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


class TorchBackbone:
    """The reference engine: timm DINOv2 in eager torch.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: ``"pretrained"``, ``"random"`` or a checkpoint path.
        image_size: input side in pixels, a multiple of 14.
        layers: mean of the patch tokens of the last ``layers`` blocks (each
            through the final norm).
        seed: for ``weights="random"``.
        device: ``"cpu"`` (default: exports trace here and are checked
            against it), ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (the first
            GPU torch sees, else the CPU); a GPU that is not there raises
            :class:`~dinopatch.backbone.device.DeviceUnavailableError`.
        precision: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` autocast (the
            weights stay float32; tokens are returned as float32).
        model: a built timm model to use instead of building one.
        fingerprint: the weights fingerprint expected; other weights are refused.

    Attributes:
        device: the torch device the model runs on (``"cpu"``, ``"cuda:N"``).
    """

    engine = "torch"

    def __init__(self, name="dinov2_vits14", weights="pretrained", image_size=448, layers=1, seed=0,
                 device="cpu", model=None, fingerprint=None, precision="fp32"):
        if precision not in AUTOCAST:
            raise ValueError(f"torch precision {precision!r} must be one of {tuple(AUTOCAST)}")
        self.precision = precision
        self.device = torch_device(device)
        self.spec = get_spec(name)
        self.image_size = check_image_size(image_size, self.spec.patch_size)
        if int(layers) < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = int(layers)
        self.model = (model if model is not None else build_model(self.spec, weights, self.image_size, seed))
        self.model = self.model.to(self.device)
        self._fingerprint = None
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(f"weights {str(weights)!r} have fingerprint {self.fingerprint[:16]}..., "
                             f"expected {fingerprint[:16]}... (the detector was fitted with other weights)")

    @property
    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the model."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.spec.patch_size
        return side, side

    def forward_tensor(self, x, positions=None):
        """``[B, 3, S, S]`` normalised tensor -> tokens (differentiable, exportable).

        Args:
            x: normalised images.
            positions: None for every patch, giving ``[B, h, w, D]``; or an int64
                tensor ``[n]`` of flat patch indices, giving ``[B, n, D]``.
        """
        import torch

        if positions is None:
            feats = self.model.forward_intermediates(
                x, indices=self.layers, norm=True, output_fmt="NLC", intermediates_only=True
            )
            h, w = self.grid
            return _mean(feats).reshape(x.shape[0], h, w, -1)
        m = self.model
        if getattr(m, "rope", None) is not None:
            return self._rope_tokens(x, positions)
        if m.dynamic_img_size or m.pos_embed is None:
            raise ValueError(f"{self.spec.name}: positions need a fixed-size absolute position embedding")
        patches = torch.index_select(m.patch_embed(x), 1, positions)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        # As timm's _pos_embed, with the embedding gathered at the kept patches.
        if m.no_embed_class:
            t = torch.cat(prefix + [patches + torch.index_select(m.pos_embed, 1, positions)], dim=1)
        else:
            n_prefix = len(prefix)
            rows = torch.cat([torch.arange(n_prefix, dtype=positions.dtype, device=positions.device),
                              positions + n_prefix])
            t = torch.cat(prefix + [patches], dim=1) + torch.index_select(m.pos_embed, 1, rows)
        t = m.norm_pre(m.patch_drop(m.pos_drop(t)))
        feats = []
        for i, block in enumerate(m.blocks):
            t = block(t)
            if i >= len(m.blocks) - self.layers:
                feats.append(m.norm(t)[:, m.num_prefix_tokens:])
        return _mean(feats)

    def _rope_tokens(self, x, positions):
        """Tokens ``[B, n, D]`` at ``positions`` of a rotary-position model (DINOv3, timm's Eva).

        The rotation of each kept patch is gathered like its embedding, so attention among the kept
        patches sees their true places; the prefix (class and register) tokens carry no rotation.
        """
        import torch

        m = self.model
        patches = m.patch_embed(x)
        patches = torch.index_select(patches.reshape(x.shape[0], -1, patches.shape[-1]), 1, positions)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        rope = torch.index_select(m.rope.get_embed(shape=list(self.grid)), 0, positions)
        t = m.norm_pre(torch.cat(prefix + [patches], dim=1))
        feats = []
        for i, block in enumerate(m.blocks):
            t = block(t, rope=rope)
            if i >= len(m.blocks) - self.layers:
                feats.append(m.norm(t)[:, m.num_prefix_tokens:])
        return _mean(feats)

    def __call__(self, images: np.ndarray, positions=None, *, on_device: bool = False):
        """uint8 BGR ``[B, H, W, 3]`` -> float32 tokens ``[B, h, w, D]``, or ``[B, n, D]`` at ``positions``.

        ``on_device``: a C-contiguous float32 tensor on the engine's device
        instead of a host array (the cuda kernel reads it in place); its
        computation may still be running when it is returned.
        """
        import torch

        x = preprocess(images, self.image_size, self.spec.mean, self.spec.std)
        pos = None if positions is None else torch.from_numpy(check_positions(positions, self.grid)).to(self.device)
        dtype = AUTOCAST[self.precision]
        autocast = torch.autocast(self.device.partition(":")[0], dtype=getattr(torch, dtype or "float32"),
                                  enabled=dtype is not None)
        with torch.inference_mode(), autocast:
            out = self.forward_tensor(torch.from_numpy(x).to(self.device), pos)
        out = out.float().contiguous()
        return out if on_device else out.cpu().numpy()


def _mean(feats: list):
    """The mean of the last blocks' tokens (one block: itself)."""
    import torch

    return torch.stack(feats, 0).mean(0) if len(feats) > 1 else feats[0]
