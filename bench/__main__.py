"""Run every benchmark (full mode unless ``--smoke``), then rebuild BENCHMARKS.md from the results.

Each script runs in its own process, so one script's memory (model weights, caches) never shows in another's
figures, and a failing script does not stop the others.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from .common import REPO_ROOT, RESULTS_DIR
from .report import ORDER, render

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; results go to --out, BENCHMARKS.md is kept")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON results")
    parser.add_argument("--only", action="append", choices=ORDER, help="run only these scripts (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="rebuild BENCHMARKS.md from existing results")
    args = parser.parse_args(argv)
    failed = []
    if not args.report_only:
        for name in args.only or ORDER:
            command = [sys.executable, "-m", f"bench.{name}", "--out", args.out, *(["--smoke"] if args.smoke else [])]
            print(f"\n$ {' '.join(command[1:])}", flush=True)
            started = time.perf_counter()
            code = subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
            print(f"({name}: {time.perf_counter() - started:.0f} s, exit {code})", flush=True)
            if code:
                failed.append(name)
    if not args.smoke and args.out == str(RESULTS_DIR):
        (REPO_ROOT / "BENCHMARKS.md").write_text(render(RESULTS_DIR), encoding="utf-8")
        print(f"\nwrote {REPO_ROOT / 'BENCHMARKS.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
