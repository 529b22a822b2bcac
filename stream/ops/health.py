"""``aitm-stream health``: exit 0 if a process's HTTP endpoint answers 200, else 1 (one line).

The container healthcheck (deploy/Dockerfile, docker-compose.yml): the image has no curl, and
this needs nothing beyond the standard library.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from stream.ops.command import command_parser


def main(argv: list[str] | None = None) -> int:
    p = command_parser("health")
    p.add_argument("url", nargs="?", default=None, help="URL to probe (default: $HEALTH_URL)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = p.parse_args(argv)
    url = args.url or os.environ.get("HEALTH_URL")
    if not url:
        p.error("give a URL or set HEALTH_URL")
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'healthy' if ok else 'unhealthy'}: {url}")
    return 0 if ok else 1
