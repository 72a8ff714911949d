"""The prompts, kept as package data so they can be read and edited as text, not hunted for in code."""

from __future__ import annotations

from functools import cache
from importlib import resources
from string import Template

from ..text import clip

__all__ = ["clip", "load_prompt", "prompt_template"]


@cache
def load_prompt(name: str) -> str:
    """The text of ``agent/prompts/<name>``."""
    return (resources.files(__name__) / name).read_text(encoding="utf-8")


def prompt_template(name: str) -> Template:
    """A prompt with ``$placeholders`` (``string.Template``, so JSON braces in prompts need no escaping)."""
    return Template(load_prompt(name))
