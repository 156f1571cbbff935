"""Named detector configurations: ``DinoPatch.from_preset(name, **overrides)``."""

PRESETS = {
    # The seed notebook's: ViT-B/14 at 784 px (56x56x768 tokens), its post-processing.
    "notebook": dict(backbone="dinov2_vitb14", image_size=784, layers=1, tolerance=1, sigma=4.0, score="max",
                     morph_kernel=5, coreset_ratio=1.0),
}


def preset(name: str, **overrides) -> dict:
    """The parameters of the configuration ``name`` of :data:`PRESETS`, with ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dict(PRESETS[name], **overrides)
