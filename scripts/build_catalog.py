"""Build the bundled model catalog (agent/data/catalog.jsonl) from the HuggingGPT paper's p0_models.jsonl.

The paper's file holds whole model cards (median ~2,000 characters of prose each); the planner and the model
selector only need a line per model, so this keeps id, task, downloads, likes, a short description (the card's
first sentences of prose) and a few tags. It also writes agent/data/CATALOG_LICENSE.txt, the MIT license the
data comes under, with its source and the paper to cite.

    python scripts/build_catalog.py [P0_MODELS_JSONL] [--out agent/data]
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

from agent.catalog import BUNDLED_CATALOG, Catalog, ModelInfo  # noqa: E402
from agent.catalog_refresh import (  # noqa: E402
    DESCRIPTION_CHARS,
    catalog_tags,
    clip_description,
    metadata_description,
)

SOURCE = "microsoft/JARVIS @ c62e0faac76c4a2907cabe2cfe4bbe5f2e613400, hugginggpt/server/data/p0_models.jsonl"
CITATION = (
    'Yongliang Shen, Kaitao Song, Xu Tan, Dongsheng Li, Weiming Lu, Yueting Zhuang. "HuggingGPT: Solving AI\n'
    'Tasks with ChatGPT and its Friends in Hugging Face". NeurIPS 2023. arXiv:2303.17580.'
)
LICENSE_FILE = "LICENSE.microsoft-JARVIS.MIT.txt"

_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), " "),
    (re.compile(r"^\s*(```|~~~).*?^\s*\1", re.S | re.M), "\n\n"),  # fenced code
    (re.compile(r"<(script|style|pre|code|table)\b.*?</\1>", re.S | re.I), "\n\n"),
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), " "),  # images
    (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),  # links keep their text
    (re.compile(r"\[([^\]]*)\]\[[^\]]*\]"), r"\1"),  # reference links
    (re.compile(r"<[^>]+>"), " "),  # other HTML tags
    (re.compile(r"https?://\S+"), " "),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"(?<!\w)(\*\*|__|\*|_)(?=\S)(.+?)(?<=\S)\1(?!\w)"), r"\2"),  # emphasis, not snake_case
]
# Lines that are not prose: headings, list items, tables, rules, quotes, front-matter remnants.
_NOT_PROSE = re.compile(r"^\s*(#|[-*+]\s|\d+[.)]\s|\||>|[-=_*]{3,}|\w[\w-]*:\s*\S*$)")
# Paragraphs (and later sentences) about the card, the authors or the code rather than the model.
_BOILERPLATE = re.compile(
    r"^(disclaimer|note|warning|update|news|important|citation|license|paper|repository|demo|if you |"
    r"please |this model card |for more (details|information)|for a better experience|you can (use|find|try|test)|"
    r"see |check |access to model |to run these |authors?:|creators?:|original author|the following |"
    r"find below |create your own |since people |this work is licensed |link to |full credits? |report |you may |"
    r"in a jupyter |"
    r"the (model|code|following)[^.]* (is|are) (available|provided) )",
    re.I,
)
_CODE = re.compile(r'"""|>>>|\|.*\||=\s*["\'(\[{]')
# A sentence ends at . ! or ? before a capital, a digit or a bracket, but not after "et al." or "e.g.".
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\bal\.)(?<!\be\.g\.)(?<!\bi\.e\.)\s+(?=[A-Z0-9(\"'])")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s+")
_MIN_WORDS = 6


def card_meta(raw: Any) -> dict[str, Any]:
    """The card's YAML header as a dict: some lines hold it as a Python repr string, some hold junk."""
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return {}
    return raw if isinstance(raw, dict) else {}


def as_int(value: Any) -> int:
    """Downloads and likes, which some lines give as strings ("1,234")."""
    try:
        return int(str(value).replace(",", "").strip() or 0)
    except ValueError:
        return 0


def _blocks(card: str) -> Iterator[tuple[str, list[str]]]:
    """Each block of the card, as its prose (markup stripped, one line) and its list items."""
    text = card.replace("\r\n", "\n").replace("\u200b", "").replace("\ufeff", "")
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    text = html.unescape(text)
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        prose = " ".join(line for line in lines if not _NOT_PROSE.match(line))
        items = [_LIST_ITEM.sub("", line) for line in lines if _LIST_ITEM.match(line)]
        if prose:
            yield " ".join(prose.split()), [" ".join(item.split()).rstrip(";,.") for item in items]


def _is_prose(paragraph: str) -> bool:
    letters = sum(c.isalpha() for c in paragraph)
    return (
        len(paragraph.split()) >= _MIN_WORDS
        and letters >= 0.6 * len(paragraph)
        and not _BOILERPLATE.match(paragraph)
        and not _CODE.search(paragraph)
        and paragraph.lower() != "entry not found"
    )


def _lead_sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences up to the first boilerplate one."""
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        if kept and _BOILERPLATE.match(sentence):
            break
        kept.append(sentence)
    return kept


def prose_description(card: str) -> str:
    """The first sentences of the card's first prose paragraph, at most 200 characters; "" if none.

    A lone sentence ending in ':' takes the list under it ("... model from fairseq: English; Trained on
    LJSpeech."); elsewhere sentences ending in ':' are dropped, as what they introduce was not kept.
    """
    for prose, items in _blocks(card):
        sentences = _lead_sentences(prose) if _is_prose(prose) else []
        if len(sentences) == 1 and sentences[0].endswith(":") and items:
            sentences = [f"{sentences[0]} {'; '.join(items)}."]
        while sentences and sentences[-1].endswith(":"):
            sentences.pop()
        if not sentences:
            continue
        text = sentences[0]
        for sentence in sentences[1:]:
            if len(text) + 1 + len(sentence) > DESCRIPTION_CHARS:
                break
            text += " " + sentence
        return clip_description(text)
    return ""


def model_info(row: dict[str, Any]) -> ModelInfo:
    task = str(row["task"])
    meta = card_meta(row.get("meta"))
    tags = catalog_tags(meta, task=task)
    return ModelInfo(
        id=str(row["id"]),
        task=task,
        downloads=as_int(row.get("downloads")),
        likes=as_int(row.get("likes")),
        description=prose_description(str(row.get("description") or "")) or metadata_description(task, meta, tags),
        tags=tags,
    )


def license_text(source_license: Path) -> str:
    header = (
        "The bundled model catalog (catalog.jsonl) is derived from the model list of HuggingGPT's reference code:\n"
        f"  {SOURCE}\n"
        "  https://github.com/microsoft/JARVIS\n"
        "It keeps each model's id, task, download and like counts, a few tags and a short description taken\n"
        "from the model card. That list comes under the MIT license below.\n\n"
        f"Cite:\n  {CITATION.replace(chr(10), chr(10) + '  ')}\n\n"
        + "-" * 78
        + "\n\n"
    )
    return header + textwrap.dedent(source_license.read_text(encoding="utf-8")).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", nargs="?", type=Path, default=REPO.parent / "shared" / "hugginggpt" / "p0_models.jsonl"
    )
    parser.add_argument("--out", type=Path, default=REPO / "agent" / "data", help="directory to write into")
    args = parser.parse_args(argv)
    with args.source.open(encoding="utf-8") as f:
        models = [model_info(json.loads(line)) for line in f if line.strip()]
    catalog = Catalog(models)
    args.out.mkdir(parents=True, exist_ok=True)
    catalog.save(args.out / BUNDLED_CATALOG)
    (args.out / "CATALOG_LICENSE.txt").write_text(license_text(args.source.parent / LICENSE_FILE), encoding="utf-8")
    counts = Counter(m.task for m in catalog)
    fallbacks = sum(1 for m in catalog if m.description.startswith(f"{m.task} model"))
    print(f"{len(catalog)} models, {len(counts)} tasks -> {args.out / BUNDLED_CATALOG}")
    for task, n in sorted(counts.items()):
        print(f"  {task}: {n}")
    print(f"  descriptions from metadata: {fallbacks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
