"""The layering rule of DESIGN.md: the engine (``agent``) imports no adapter, so it runs without them.

As smolagents' ``tests/test_import.py`` guards its extras, every module of ``agent`` is imported in a fresh
interpreter where ``storage``, ``bot``, ``app`` and ``discord`` cannot be imported at all.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import agent

BLOCKED = ("storage", "bot", "app", "discord")

_PROBE = """
import importlib, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"the engine imported {{name}}")
        return None

sys.meta_path.insert(0, Blocked())
for module in {modules!r}:
    importlib.import_module(module)
print("imported", len({modules!r}))
"""


def _engine_modules() -> list[str]:
    return ["agent", *(m.name for m in pkgutil.walk_packages(agent.__path__, prefix="agent."))]


def test_the_engine_imports_without_storage_the_bot_or_discord() -> None:
    modules = sorted(set(_engine_modules()))
    assert "agent.planner" in modules and "agent.backends.hf" in modules
    probe = _PROBE.format(blocked=BLOCKED, modules=modules)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"imported {len(modules)}" in done.stdout


def test_the_probe_sees_a_forbidden_import() -> None:
    """The check itself works: importing the application from the blocked interpreter fails."""
    probe = _PROBE.format(blocked=BLOCKED, modules=["app.conversations"])
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "imported app" in done.stderr
