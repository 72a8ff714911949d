"""The task registry: every task type HuggingGPT can plan, with its argument keys and modalities.

The 24 Hugging Face tasks of the paper's catalog plus the ControlNet family. A task's arguments are named by
modality (``text``, ``image``, ``audio``, ``video``), as in the paper; a few tasks take a second text argument
(``context`` for question answering, ``text2`` for sentence similarity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CONTROLNET_CONDITIONS",
    "LLM_TASKS",
    "MEDIA_KINDS",
    "TASKS",
    "Arg",
    "Modality",
    "TaskType",
    "get_task",
]

Modality = Literal["text", "image", "audio", "video"]
MEDIA_KINDS: tuple[Modality, ...] = ("image", "audio", "video")


@dataclass(frozen=True)
class Arg:
    key: str
    modality: Modality
    required: bool = True


@dataclass(frozen=True)
class TaskType:
    name: str
    description: str
    args: tuple[Arg, ...]
    output: Modality
    llm_handled: bool = False

    @property
    def inputs(self) -> tuple[Modality, ...]:
        return tuple(dict.fromkeys(a.modality for a in self.args))

    def arg(self, key: str) -> Arg | None:
        return next((a for a in self.args if a.key == key), None)


_T = Arg("text", "text")
_I = Arg("image", "image")
_A = Arg("audio", "audio")

_BASE: tuple[TaskType, ...] = (
    # Natural language
    TaskType("text-classification", "label a text (sentiment, topic, ...)", (_T,), "text"),
    TaskType("token-classification", "label words in a text (named entities, parts of speech)", (_T,), "text"),
    TaskType("text2text-generation", "rewrite a text into another text", (_T,), "text", llm_handled=True),
    TaskType("summarization", "summarize a text", (_T,), "text", llm_handled=True),
    TaskType("translation", "translate a text (say the target language in the text)", (_T,), "text", llm_handled=True),
    TaskType(
        "question-answering",
        "answer a question (text) from a context text",
        (_T, Arg("context", "text", required=False)),
        "text",
    ),
    TaskType("conversational", "reply in a conversation", (_T,), "text", llm_handled=True),
    TaskType("text-generation", "write text from a prompt", (_T,), "text", llm_handled=True),
    TaskType(
        "sentence-similarity",
        "score how similar two texts are",
        (_T, Arg("text2", "text")),
        "text",
    ),
    TaskType("tabular-classification", "classify the rows of a table shown in an image", (_I,), "text"),
    # Computer vision
    TaskType("object-detection", "find and box the objects in an image", (_I,), "image"),
    TaskType("image-classification", "say what an image shows, as labels", (_I,), "text"),
    TaskType("image-to-text", "describe an image in words (captioning)", (_I,), "text"),
    TaskType("text-to-image", "draw an image from a description", (_T,), "image"),
    TaskType(
        "image-to-image",
        "change an image following an instruction",
        (_I, Arg("text", "text", required=False)),
        "image",
    ),
    TaskType("image-segmentation", "split an image into labelled regions (masks)", (_I,), "image"),
    TaskType("depth-estimation", "estimate the depth of each pixel of an image", (_I,), "image"),
    TaskType("visual-question-answering", "answer a question (text) about an image", (_I, _T), "text"),
    TaskType(
        "document-question-answering",
        "answer a question (text) about a document image (OCR)",
        (_I, _T),
        "text",
    ),
    TaskType("text-to-video", "make a short video from a description", (_T,), "video"),
    # Audio
    TaskType("text-to-speech", "read a text aloud", (_T,), "audio"),
    TaskType("automatic-speech-recognition", "transcribe speech in an audio file", (_A,), "text"),
    TaskType("audio-to-audio", "transform audio (denoise, separate sources)", (_A,), "audio"),
    TaskType("audio-classification", "label an audio clip (sound, speaker, emotion)", (_A,), "text"),
)

CONTROLNET_CONDITIONS: tuple[str, ...] = ("canny", "depth", "hed", "mlsd", "normal", "openpose", "seg")

_CONTROL: tuple[TaskType, ...] = tuple(
    TaskType(f"{c}-control", f"extract the {c} control map of an image", (_I,), "image")
    for c in ("canny", "hed", "mlsd", "normal", "openpose")
) + tuple(
    TaskType(
        f"{c}-text-to-image",
        f"draw an image from a description, following a {c} control map image",
        (_T, _I),
        "image",
    )
    for c in CONTROLNET_CONDITIONS
)

TASKS: dict[str, TaskType] = {t.name: t for t in _BASE + _CONTROL}
LLM_TASKS: frozenset[str] = frozenset(t.name for t in TASKS.values() if t.llm_handled)


def get_task(name: str) -> TaskType | None:
    return TASKS.get(name)
