"""Command line: `etagproxy run | check-config | demo | inspect`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from etagproxy import __version__
from etagproxy.config import Config, ConfigError, dump_effective, load_config
from etagproxy.logs import FORMATS, setup_logging

log = logging.getLogger("etagproxy")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def log_format_default() -> str:
    """`--log-format` default: ETAGPROXY_LOG_FORMAT (for containers), else json."""
    return os.environ.get("ETAGPROXY_LOG_FORMAT", "json").strip().lower() or "json"


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    if args.workers > 1 and config.store.kind == "memory":
        print(
            "etagproxy: --workers > 1 needs a shared store: memory:// keeps versions inside one "
            "process, so workers would hand out conflicting ETags. Use a redis:// store or one worker.",
            file=sys.stderr,
        )
        return 2
    if args.workers < 1:
        print("etagproxy: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.log_format not in FORMATS:
        print(f"etagproxy: log format must be one of {', '.join(FORMATS)}, got {args.log_format!r}", file=sys.stderr)
        return 2
    setup_logging(args.log_format)
    log.info("effective config", extra={"fields": {"config": dump_effective(config)}})
    _install_uvloop()
    if args.workers > 1:
        from etagproxy.workers import supervise

        return supervise(config, args)
    from etagproxy.app import serve

    return asyncio.run(serve(config, access_log=not args.no_access_log, log_format=args.log_format))


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 2
    print(f"{args.file}: OK ({len(config.routes)} routes, store {config.store.masked_url})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from etagproxy.demo import run_demo

    return asyncio.run(run_demo(serve_forever=args.serve))


def cmd_inspect(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    from etagproxy.inspect import inspect_url

    return asyncio.run(inspect_url(config, args.url))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etagproxy",
        description="Reverse proxy that gives an unmodified HTTP API strong ETags and "
        "RFC 9110 conditional requests.",
    )
    parser.add_argument("--version", action="version", version=f"etagproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, help="YAML config file")
    run.add_argument("--workers", type=int, default=1, help="processes sharing the port (needs redis)")
    run.add_argument(
        "--log-format", default=log_format_default(), metavar="{json,text}",
        help="access and operational logs as JSON lines (default) or text for people; "
        "default from ETAGPROXY_LOG_FORMAT",
    )
    run.add_argument("--no-access-log", action="store_true", help="do not print a line per request")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="play the lost-update story against a toy API")
    demo.add_argument("--serve", action="store_true", help="keep the toy API and proxy running")
    demo.set_defaults(func=cmd_demo)

    insp = sub.add_parser("inspect", help="show the key, token and state for a URL")
    insp.add_argument("--config", required=True)
    insp.add_argument("url")
    insp.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
