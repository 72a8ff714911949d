"""Shared test setup: no test may reach the network, and none may read the developer's .env."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "HF_", "HUGGINGGPT_", "DISCORD_", "LOCAL_LLM_")) or name == "LLM_MODEL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HUGGINGGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
