"""The ShapeWorld scene browser: a scene, its boxes and every annotation."""

from __future__ import annotations


import ipywidgets as widgets

from course_lib.data.shapeworld import SPLITS, ShapeWorld
from course_lib.viz import show_scene
from course_lib.widgets.base import Explorer, dropdown, esc


def describe_scene(scene) -> str:
    """Every annotation of a scene as plain text (what the browser prints under the image)."""
    lines = [f"{scene.split} scene {scene.index}: {len(scene.objects)} objects"]
    lines += [f"  object {i}: {o.name} at box {tuple(round(v, 2) for v in o.box)}" for i, o in enumerate(scene.objects)]
    lines.append("relations: " + ("; ".join(f"{s} {r} {o}" for s, r, o in scene.relations) or "none"))
    lines.append("captions:")
    lines += [f"  - {c}{'   (noisy)' if n else ''}" for c, n in zip(scene.captions, scene.caption_is_noisy)]
    lines.append("region phrases: " + " | ".join(scene.region_phrases))
    lines.append("questions:")
    lines += [f"  [{t}] {q} -> {a}" for q, a, t in scene.questions]
    return "\n".join(lines)


def scene_browser(world: ShapeWorld, max_index: int = 999) -> Explorer:
    """A slider over scene indices, a split and an image-size chooser; shows the scene with its
    boxes and every annotation. Returns the widget box (display it, or read ``.readout.value``)."""
    splits = [s for s in SPLITS if s != "compositional" or world.config.held_out]
    controls = {"index": widgets.IntSlider(value=0, min=0, max=max_index, description="scene"),
                "split": dropdown("split", splits, "train"),
                "size": dropdown("pixels", [32, 64, 128, 224], 64)}

    def draw(fig) -> str:
        scene = world.scene(controls["index"].value, controls["split"].value)
        size = controls["size"].value
        show_scene(world.render(scene, size), scene.boxes(size), [o.name for o in scene.objects], ax=fig.subplots())
        return f"<pre>{esc(describe_scene(scene))}</pre>"

    return Explorer(controls, draw, figsize=(3, 3))
