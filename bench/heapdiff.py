"""`python -m bench.heapdiff OLD NEW [--top 15] [--by lineno|traceback|filename]`: what grew
between two tracemalloc snapshots of one service (`CCBRIDGE_TRACEMALLOC=<dir>`, see
shared.runtime.start_heap_snapshots and docs/performance.md, "Memory").

Prints the biggest size differences, largest first, with the allocation count difference —
a leak shows as a line whose count grows with the traffic between the two snapshots.
"""

from __future__ import annotations

import argparse
import linecache
import tracemalloc
from pathlib import Path

IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def load(path: Path) -> tracemalloc.Snapshot:
    return tracemalloc.Snapshot.load(str(path)).filter_traces(IGNORED)


def _where(frame: tracemalloc.Frame) -> str:
    source = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{frame.filename}:{frame.lineno}" + (f"  {source}" if source else "")


def diff_lines(old: Path, new: Path, *, top: int = 15, key: str = "lineno") -> list[str]:
    stats = load(new).compare_to(load(old), key)
    lines = [
        f"total {sum(s.size_diff for s in stats) / 1e6:+.2f} MB "
        f"({sum(s.count_diff for s in stats):+,} blocks); largest differences first:"
    ]
    for stat in stats[:top]:
        frames = list(reversed(stat.traceback))  # most recent call first
        lines.append(f"{stat.size_diff / 1e3:+10.1f} KB {stat.count_diff:+9,} blocks  {_where(frames[0])}")
        if key == "traceback":
            lines.extend(f"{'':32}{_where(frame)}" for frame in frames[1:])
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heapdiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--by", choices=("lineno", "traceback", "filename"), default="lineno")
    args = parser.parse_args(argv)
    print("\n".join(diff_lines(args.old, args.new, top=args.top, key=args.by)))


if __name__ == "__main__":
    main()
