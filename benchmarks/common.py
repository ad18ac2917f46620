"""Shared helpers for the benchmark scripts: peak-RSS sampling, atomic JSON, markdown tables."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the maximum seen (bytes)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def commit(tree: Path = Path(__file__).resolve().parent.parent) -> str:
    """HEAD of the git tree ``tree`` (this repository by default), marked ``+uncommitted`` when its ``src`` differs."""
    sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "src"], capture_output=True,
                           text=True).stdout
    return sha + ("+uncommitted" if dirty.strip() else "")


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) so that a later ``peak_rss()`` covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def folders(ap: Any, default_results: Path, prefix: str) -> tuple[Any, Path, Path]:
    """Add ``--work`` and ``--results`` to the parser ``ap``, parse, and make the folders: (args, work, results)."""
    import tempfile

    ap.add_argument("--work", default=None, help="where models and outputs go (default: a temp folder)")
    ap.add_argument("--results", default=str(default_results))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix=prefix))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    return args, work, results


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write at 110 dpi and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def measure_then_render(ap: Any, default_results: Path, measure: Any, render: Any) -> None:
    """Add ``--results`` and ``--render`` to the parser ``ap``, parse, then ``measure(args, results)`` unless only
    ``--render`` is asked, and ``render(results)``."""
    ap.add_argument("--results", default=str(default_results))
    ap.add_argument("--render", action="store_true", help="only the table and plot from results.json")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if not args.render:
        measure(args, results)
    render(results)
