#!/usr/bin/env python3
"""Build the ccbridge e2b template with the e2b Python SDK (no e2b CLI / Node needed):

    E2B_API_KEY=... .venv/bin/python deploy/e2b/build_template.py [--dry-run]

Reads claude_template.json (name, cpu, memory) and e2b.Dockerfile next to this file, and calls
`e2b.Template.build`. `--dry-run` only parses the Dockerfile and prints the template JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="parse and print, do not build")
    args = parser.parse_args(argv)

    from e2b import Template, default_build_logger

    descriptor = json.loads((HERE / "claude_template.json").read_text())
    template = Template().from_dockerfile(str(HERE / descriptor["dockerfile"]))
    if args.dry_run:
        print(Template.to_json(template))
        return 0
    info = Template.build(template, descriptor["name"], cpu_count=descriptor["cpu_count"],
                          memory_mb=descriptor["memory_mb"], on_build_logs=default_build_logger())
    print(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
