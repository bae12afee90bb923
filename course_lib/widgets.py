"""ipywidgets explorers used by the notebooks (they also work in plain Python: setting a
widget's ``.value`` redraws, which is how the tests drive them)."""

from __future__ import annotations

import html

import ipywidgets as widgets
import matplotlib.pyplot as plt

from course_lib.data.shapeworld import SPLITS, ShapeWorld
from course_lib.viz import show_scene


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


def scene_browser(world: ShapeWorld, max_index: int = 999) -> widgets.VBox:
    """A slider over scene indices, a split and an image-size chooser; shows the scene with its
    boxes and every annotation. Returns the widget box (display it, or read ``.children``)."""
    index = widgets.IntSlider(value=0, min=0, max=max_index, description="scene")
    splits = [s for s in SPLITS if s != "compositional" or world.config.held_out]
    split = widgets.Dropdown(options=splits, value="train", description="split")
    size = widgets.Dropdown(options=[32, 64, 128, 224], value=64, description="pixels")
    out = widgets.Output()
    info = widgets.HTML()  # the annotations, readable as .value (also outside a kernel)

    def redraw(_=None):
        scene = world.scene(index.value, split.value)
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(3, 3))
            labels = [o.name for o in scene.objects]
            show_scene(world.render(scene, size.value), scene.boxes(size.value), labels, ax=ax)
            plt.show()
        plt.close(fig)
        info.value = f"<pre>{html.escape(describe_scene(scene))}</pre>"

    for w in (index, split, size):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([index, split, size]), out, info])
