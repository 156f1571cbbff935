"""The 180-degree polarity of aligned token grids, settled from features.

Alignment resolves the part's 180-degree ambiguity from its silhouette; near
symmetric outlines leave it open.  :class:`Polarity` learns the nominal token
profile along the principal (horizontal) axis and turns each grid that matches
it better rotated.
"""
from __future__ import annotations

import numpy as np


class Polarity:
    """Nominal token profile along the principal axis; turns grids to match it.

    Args:
        reference: float32 ``[w, D]`` profile, from :meth:`fit` or a model file.
    """

    def __init__(self, reference: np.ndarray):
        reference = np.asarray(reference)
        if reference.ndim != 2 or reference.dtype != np.float32 or not np.isfinite(reference).all():
            raise ValueError(f"polarity reference must be finite float32 [w, D], "
                             f"got {reference.dtype}{reference.shape}")
        self.reference = reference

    @classmethod
    def fit(cls, tokens: np.ndarray, rounds: int = 3) -> "Polarity":
        """The nominal profile of token grids ``[N, h, w, D]``, each sample in its better orientation."""
        prof = _profile(tokens)
        ref = prof.mean(axis=0)
        for _ in range(rounds):
            flip = _flip_better(prof, ref)
            ref = np.where(flip[:, None, None], prof[:, ::-1], prof).mean(axis=0)
        return cls(ref.astype(np.float32))

    def orient(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grids ``[B, h, w, D]`` turned where that matches better, and which were turned ``[B]``.

        ``tokens`` may also be a torch tensor on a GPU: it is turned there, and
        only its profile ``[B, w, D]`` comes to the host.
        """
        profile = _profile(tokens)
        profile = profile if isinstance(profile, np.ndarray) else profile.cpu().numpy()
        flip = _flip_better(profile, self.reference)
        if not isinstance(tokens, np.ndarray):
            import torch

            turn = torch.from_numpy(flip).to(tokens.device)[:, None, None, None]
            return torch.where(turn, tokens.flip(1, 2), tokens), flip
        out = tokens.copy()
        out[flip] = tokens[flip][:, ::-1, ::-1]
        return out, flip


def unflip(distances: np.ndarray, flipped: bool) -> np.ndarray:
    """A grid scored turned goes back to its canonical image's orientation."""
    return distances[::-1, ::-1] if flipped else distances


def _profile(tokens: np.ndarray) -> np.ndarray:
    """Token grids ``[B, h, w, D]`` -> their profile along the principal (horizontal) axis ``[B, w, D]``."""
    return tokens.mean(axis=1)


def _flip_better(prof: np.ndarray, ref: np.ndarray) -> np.ndarray:
    keep = ((prof - ref) ** 2).sum(axis=(1, 2))
    flip = ((prof[:, ::-1] - ref) ** 2).sum(axis=(1, 2))
    return flip < keep
