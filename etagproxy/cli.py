"""Command line: `etagproxy run | check-config | demo | inspect | routes`."""

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


def _read_source(source: str) -> str:
    """The text of a file path or an http(s) URL (gzip is undone); OSError on failure."""
    if source.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(source, timeout=30) as response:  # http(s) only: checked above
            data = response.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    return data.decode("utf-8")


def _read_or_fail(source: str, what: str) -> str:
    try:
        return _read_source(source)
    except UnicodeDecodeError as exc:
        raise _Failed(f"{source}: {what} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise _Failed(f"{source}: cannot read the {what}: {reason}") from None
    except ValueError as exc:  # a malformed URL, or a gzip stream that is not one
        raise _Failed(f"{source}: cannot read the {what}: {exc}") from None


class _Failed(Exception):
    """A one-line reason `routes` stops with status 2."""


def cmd_routes(args: argparse.Namespace) -> int:
    from etagproxy import openapi
    from etagproxy.config import parse_config

    try:
        schema = openapi.parse_document(_read_or_fail(args.from_openapi, "schema"), args.from_openapi)
        generated = openapi.routes_from_schema(schema)
        if args.overrides:
            text = _read_or_fail(args.overrides, "overrides file")
            generated = openapi.merge_overrides(generated, openapi.parse_overrides(text, args.overrides))
    except (_Failed, openapi.OpenAPIError) as exc:
        print(exc, file=sys.stderr)
        return 2
    command = f"etagproxy routes --from-openapi {args.from_openapi}"
    if args.overrides:
        command += f" --overrides {args.overrides}"
    out = openapi.render(generated, source=args.from_openapi, upstream=args.upstream, command=command)
    try:
        parse_config(out, filename=args.output or "<generated>")
    except ConfigError as exc:
        print("etagproxy: the generated routes do not pass check-config:", file=sys.stderr)
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(out)
        except OSError as exc:
            print(f"{args.output}: cannot write: {exc.strerror}", file=sys.stderr)
            return 2
        n = openapi.counts(generated)
        print(f"{args.output}: {len(generated.routes)} routes ({n['item']} item, {n['collection']} collection,"
              f" {n['passthrough']} passthrough, {n['override']} from overrides); {n['omitted']} paths omitted",
              file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0


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

    routes = sub.add_parser("routes", help="generate routes YAML from an OpenAPI 3.x schema")
    routes.add_argument("--from-openapi", required=True, metavar="SCHEMA",
                        help="OpenAPI 3.0/3.1 schema, JSON or YAML: a file path or an http(s) URL")
    routes.add_argument("--overrides", metavar="FILE",
                        help="YAML mapping of route path -> settings merged over the generated ones")
    routes.add_argument("--upstream", metavar="URL", help="the upstream: line (default: a placeholder)")
    routes.add_argument("-o", "--output", metavar="OUT", help="write here instead of standard output")
    routes.set_defaults(func=cmd_routes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
