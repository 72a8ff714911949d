"""What `make` installs: the pieces of the install path that live outside pyproject.toml."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_llama_cpp_is_built_with_the_pinned_version_and_never_with_amx(tmp_path: Path) -> None:
    """scripts/llama-build.sh installs llama-cpp-python before pyproject's pin is read: both must agree, and
    the options it picks turn AVX-512 on where the CPU has it but never AMX (which segfaults here)."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    version = re.search(r"^LLAMA_VERSION := (\S+)$", makefile, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert version and f'"llama-cpp-python=={version[1]}"' in pyproject

    def args(flags: str) -> str:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n", encoding="ascii")
        script = ROOT / "scripts" / "llama-build.sh"
        run = subprocess.run(
            ["bash", str(script), "--print-args"],
            env={"CPUINFO": str(cpuinfo), "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=True,
        )
        return run.stdout.strip()

    avx512 = "fpu avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512cd avx512_vnni amx_tile amx_int8"
    assert args(avx512) == "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
    assert args("fpu avx2 fma f16c") == "-DGGML_NATIVE=OFF"
    assert args("fpu avx512f avx512_vnni") == "-DGGML_NATIVE=OFF"  # AVX-512 needs its whole base set
