"""Inputs to calibrate int8 on and to measure accuracy drops with: real images where the model
takes images, seeded values otherwise.

The images are the colour photographs scikit-image ships in its wheel (`skimage/data/`:
astronaut, chelsea, coffee, rocket, ...), read with Pillow; nothing is downloaded. A model
takes images when it has one float input of shape [N, H, W, 3] or [N, 3, H, W]. Each sample
is a seeded crop of one photograph, resized to H x W, and encoded as the `Calibration` mode
says: caffe (BGR, 0-255, less the ImageNet mean [104, 117, 123]: Caffe-trained classifiers
such as open_nsfw) or unit (RGB in [0, 1]). Calibration and evaluation sets come from
different photographs, so an accuracy drop is never measured on what int8 was fitted to.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnx

from partita.model.load import np_dtype, seeded_inputs, value_shape

# Colour photographs of skimage/data (grey and synthetic images left out), in a fixed order.
PHOTOGRAPHS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "color.png",
    "motorcycle_right.png",
    "logo.png",
)
CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


class Calibration(StrEnum):
    CAFFE = "caffe"
    UNIT = "unit"
    SEEDED = "seeded"


class Split(StrEnum):
    CALIBRATION = "calibration"
    EVALUATION = "evaluation"


@dataclass(frozen=True)
class SampleSet:
    """Model feeds, and what they are (for the status: images or seeded values)."""

    feeds: tuple[dict[str, np.ndarray], ...]
    source: str
    images: bool


def photograph_paths() -> list[Path]:
    """The photographs found in the installed scikit-image wheel (empty without it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [data / name for name in PHOTOGRAPHS if (data / name).is_file()]


def image_input(model: onnx.ModelProto) -> tuple[str, tuple[int, ...], bool] | None:
    """(name, shape, channels_last) of the model's one image input, None if it has none."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        return None
    vi = inputs[0]
    shape = value_shape(vi)
    if shape is None or len(shape) != 4:
        return None
    if not np.issubdtype(np_dtype(vi.type.tensor_type.elem_type), np.floating):
        return None
    if shape[3] == 3:
        return vi.name, tuple(shape), True
    if shape[1] == 3:
        return vi.name, tuple(shape), False
    return None


def sample_set(
    model: onnx.ModelProto, mode: Calibration, split: Split, count: int, seed: int = 0
) -> SampleSet:
    """`count` feeds for `model`: photographs when it takes images and `mode` is an image
    mode (calibration and evaluation from disjoint photographs), seeded values otherwise."""
    found = image_input(model)
    photos = photograph_paths()
    if mode is Calibration.SEEDED or found is None or len(photos) < 2:
        offset = 0 if split is Split.CALIBRATION else 10_000
        feeds = tuple(seeded_inputs(model, seed + offset + k) for k in range(count))
        return SampleSet(feeds, "seeded values", images=False)
    name, shape, channels_last = found
    half = len(photos) // 2
    chosen = photos[:half] if split is Split.CALIBRATION else photos[half:]
    rng = np.random.default_rng(seed + (0 if split is Split.CALIBRATION else 1))
    dtype = np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    height, width = (shape[1], shape[2]) if channels_last else (shape[2], shape[3])
    pictures = [_rgb(path) for path in chosen]
    feeds_list = []
    for k in range(count):
        crop = _crop(pictures[k % len(pictures)], height, width, rng)
        batch = np.repeat(_encode(crop, mode)[None], shape[0], axis=0)
        if not channels_last:
            batch = batch.transpose(0, 3, 1, 2)
        feeds_list.append({name: np.ascontiguousarray(batch, dtype=dtype)})
    names = ", ".join(p.stem for p in chosen)
    return SampleSet(tuple(feeds_list), f"scikit-image photographs ({names})", images=True)


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _crop(picture: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded square-ish crop of 50-100% of the picture's shorter side, resized to H x W."""
    from PIL import Image

    h, w = picture.shape[:2]
    side = int(min(h, w) * rng.uniform(0.5, 1.0))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    piece = Image.fromarray(picture[top : top + side, left : left + side])
    return np.asarray(piece.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _encode(rgb: np.ndarray, mode: Calibration) -> np.ndarray:
    if mode is Calibration.UNIT:
        return rgb / 255.0
    return rgb[:, :, ::-1] - CAFFE_MEAN_BGR
