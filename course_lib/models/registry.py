"""Every system the pretraining command can build, by name: ``MODELS[name] = (config class, model class)``.

    model = build_model("clip", "gpu-base", vision_layers=6)

A config class has ``from_preset(preset, **overrides)`` (sizes from ``course_lib.presets``,
type-checked overrides); a model class takes that config. Add a system by adding one line.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from course_lib.models.albef import ALBEF, ALBEFConfig
from course_lib.models.b2t2 import B2T2, B2T2Config
from course_lib.models.clip import CLIP, CLIPConfig
from course_lib.models.ernie_vil import ErnieViL, ErnieViLConfig
from course_lib.models.lxmert import LXMERT, LXMERTConfig
from course_lib.models.oscar import Oscar, OscarConfig
from course_lib.models.pixel_bert import PixelBert, PixelBertConfig
from course_lib.models.unicoder_vl import UnicoderVL, UnicoderVLConfig
from course_lib.models.unified_vlp import UnifiedVLP, UnifiedVLPConfig
from course_lib.models.uniter import Uniter, UniterConfig
from course_lib.models.vilbert import ViLBERT, ViLBERTConfig
from course_lib.models.visualbert import VisualBert, VisualBertConfig
from course_lib.models.vl_bert import VLBert, VLBertConfig


class ModelEntry(NamedTuple):
    config: type
    model: type


MODELS: dict[str, ModelEntry] = {
    "clip": ModelEntry(CLIPConfig, CLIP),
    "albef": ModelEntry(ALBEFConfig, ALBEF),
    "visualbert": ModelEntry(VisualBertConfig, VisualBert),
    "b2t2": ModelEntry(B2T2Config, B2T2),
    "unicoder_vl": ModelEntry(UnicoderVLConfig, UnicoderVL),
    "vl_bert": ModelEntry(VLBertConfig, VLBert),
    "unified_vlp": ModelEntry(UnifiedVLPConfig, UnifiedVLP),
    "uniter": ModelEntry(UniterConfig, Uniter),
    "oscar": ModelEntry(OscarConfig, Oscar),
    "lxmert": ModelEntry(LXMERTConfig, LXMERT),
    "vilbert": ModelEntry(ViLBERTConfig, ViLBERT),
    "ernie_vil": ModelEntry(ErnieViLConfig, ErnieViL),
    "pixel_bert": ModelEntry(PixelBertConfig, PixelBert),
}


def model_entry(name: str) -> ModelEntry:
    """The (config class, model class) registered as ``name``; an unknown name lists the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models are {sorted(MODELS)}")
    return MODELS[name]


def build_config(name: str, preset: str = "cpu-tiny", **overrides):
    """The config of model ``name`` at ``preset`` with ``overrides`` (unknown fields are errors)."""
    return model_entry(name).config.from_preset(preset, **overrides)


def build_model(name: str, preset: str = "cpu-tiny", **overrides) -> nn.Module:
    """A freshly initialised model ``name`` at ``preset`` (e.g. ``"cpu-tiny"`` ... ``"gpu-base"``)."""
    return model_entry(name).model(build_config(name, preset, **overrides))
