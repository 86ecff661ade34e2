"""Inputs that make a zoo model's outputs meaningful, so a relative deviation means
something: token ids that vary (and a padded tail) for the text encoder, an image of
printed text for the OCR models, seeded normal values for the rest."""

from __future__ import annotations

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

from partita.model.load import seeded_inputs

LINES = ("PARTITA 2026", "edge + cloud", "shard 0..3", "halo rows 42")


def text_image(height: int, width: int) -> np.ndarray:
    """An NCHW float image of black text on white, normalised as PaddleOCR's models expect."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    size = max(8, min(22, height // 2))
    for i, line in enumerate(LINES):
        y = 4 + i * (size + 14)
        if y + size > height:
            break
        draw.text((6, y), line, fill="black", font=ImageFont.load_default(size=size))
    x = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None].copy()


def zoo_inputs(name: str, model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = seeded_inputs(model, seed)
    rng = np.random.default_rng(seed)
    if name == "minilm":
        ids = feeds["input_ids"]
        feeds["input_ids"] = rng.integers(100, 5000, ids.shape).astype(ids.dtype)
        mask = np.ones_like(feeds["attention_mask"])
        mask[:, ids.shape[1] * 3 // 4 :] = 0
        feeds["attention_mask"] = mask
    elif name.startswith("ocr-"):
        shape = feeds["x"].shape
        feeds["x"] = text_image(shape[2], shape[3])
    return feeds
