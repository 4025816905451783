"""`slurmserve gateway`: the command line of the login-node gateway (`slurmserve.gateway.server`).

Registered by `launcher/cli.py`; the gateway's modules are imported only when the command runs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from slurmserve.launcher.argtypes import port, positive_float


def _on_demand(items: list[str]) -> dict[str, Path]:
    from slurmserve.config import load_config
    out = {}
    for item in items:
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise SystemExit(f"--launch-on-demand {item!r}: expected MODEL=CONFIG")
        cfg = load_config(path)
        if cfg.model.served_name != model:
            raise SystemExit(f"--launch-on-demand {item}: {path} serves `{cfg.model.served_name}`, "
                             f"not `{model}`")
        out[model] = Path(path).expanduser().resolve()
    return out


def cmd_gateway(args) -> int:
    import uvloop
    from slurmserve.gateway.server import serve
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s gateway %(levelname)s %(message)s")
    args.launch_on_demand = _on_demand(args.launch_on_demand)
    return uvloop.run(serve(args))


def register(subparsers) -> None:
    p = subparsers.add_parser("gateway", help="one OpenAI endpoint on the login node for all your jobs")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="0 picks a free port (default: 8000)")
    p.add_argument("--queue-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="how long a request waits for a job of its model to become ready (default: 60)")
    p.add_argument("--launch-on-demand", action="append", default=[], metavar="MODEL=CONFIG",
                   help="submit CONFIG when MODEL is asked for and no job serves it (repeatable)")
    p.add_argument("--idle-stop", type=positive_float, default=None, metavar="SECONDS",
                   help="stop jobs the gateway launched after this long without requests")
    p.add_argument("--poll-interval", type=positive_float, default=1.0, metavar="SECONDS",
                   help="how often the registry and squeue are read (default: 1)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="the key clients must send (default: <state dir>/gateway_key, made on first start)")
    p.set_defaults(func=cmd_gateway, command="gateway")
