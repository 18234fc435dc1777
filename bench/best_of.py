"""The command line of bench's in-process timings (hear_path.py, publish_path.py): each run in
a fresh process of the checkout --repo names, the best of --runs printed."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def main(script: str, doc: str, one_run: Callable[[], float], unit: str) -> None:
    """script's command line: one_run() (microseconds) in --runs fresh processes, or with
    --one (hidden) in this one, with --repo's chatapp."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.path.insert(1, str(args.repo))  # (after bench/ itself, before an installed chatapp)
        print(f"{one_run():.3f}")
        return
    runs = [
        float(subprocess.run([sys.executable, script, "--one", "--repo", str(args.repo)], capture_output=True,
                             text=True, check=True).stdout)
        for _ in range(args.runs)
    ]
    print(f"{args.repo}: {min(runs):.2f} {unit} (best of {len(runs)}; all: {', '.join(f'{run:.2f}' for run in runs)})")
