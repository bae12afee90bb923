"""Model size presets, as data: ``cpu-tiny`` for the notebooks up to ``gpu-base`` (the papers' sizes).

A model's config is built from a preset plus typed overrides:
``CLIPConfig.from_preset("cpu-tiny", vision="cnn")``. An unknown preset or field is an error
that lists the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class ModelSize:
    """Sizes shared by every system: a vision tower, a text tower and a joint embedding."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    embed_dim: int
    mlp_ratio: float = 4.0


PRESETS: dict[str, ModelSize] = {
    # 2 CPU cores, about a minute of training: what every notebook uses.
    "cpu-tiny": ModelSize(32, 4, 64, 2, 4, 64, 2, 4, 32, 64),
    # a laptop CPU, a few minutes.
    "cpu-small": ModelSize(64, 8, 128, 4, 4, 128, 4, 4, 32, 128),
    # one GPU, minutes to hours: ViT-S/16-like.
    "gpu-small": ModelSize(224, 16, 384, 6, 6, 384, 6, 6, 64, 256),
    # the papers' size: ViT-B/16 image tower + a 12-layer text transformer of width 512 (CLIP).
    "gpu-base": ModelSize(224, 16, 768, 12, 12, 512, 12, 8, 77, 512),
}


def get_preset(name: str) -> ModelSize:
    """The preset called ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets are {list(PRESETS)}")
    return PRESETS[name]


def apply_overrides(config, overrides: dict):
    """``dataclasses.replace`` with type checks: unknown keys and wrongly typed values are errors."""
    valid = {f.name: f for f in fields(config)}
    for key, value in overrides.items():
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for {type(config).__name__}; valid options are {sorted(valid)}")
        current = getattr(config, key)
        if current is not None and not _same_type(current, value):
            raise ValueError(
                f"option {key!r} expects {type(current).__name__}, got {value!r} ({type(value).__name__})"
            )
    return replace(config, **overrides)


def _same_type(current, value) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(current))
