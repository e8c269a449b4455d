"""`python -m alerter run | validate | state`: everything the timer does, by hand.

Exit status: 0 all went through; 1 a query or a delivery failed (what worked is recorded);
2 settings or usage error, or problems found by `validate`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from alerter import redact
from alerter.cycle import run_cycle
from alerter.detections import load_detections, syntax_problems
from alerter.ledger import LedgerError, open_store
from alerter.model import RunReport
from alerter.settings import Settings, SettingsError
from alerter.sightings import as_utc
from alerter.state import state_command
from alerter.summary import format_summary
from alerter.suppressions import SuppressionError, load_suppressions

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _parse_now(text: str) -> datetime:
    try:
        value = as_utc(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value is None:
        raise argparse.ArgumentTypeError("empty time")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alerter", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--settings", type=Path, metavar="PATH",
                        help="a local.settings.json-style file; its Values are read as environment")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", parents=[common], help="one full cycle")
    run.add_argument("--dry-run", action="store_true", help="query and show what would be sent; write and send nothing")
    run.add_argument("--now", type=_parse_now, metavar="TIME", help="run as if the clock read TIME (local source only)")
    run.add_argument("--preview", type=Path, metavar="DIR", help="write each channel's rendered payloads to DIR")

    commands.add_parser("validate", parents=[common], help="check settings and every detection file")

    state = commands.add_parser("state", parents=[common], help="inspect and manage the delivery ledger")
    state_commands = state.add_subparsers(dest="state_command", required=True)
    listing = state_commands.add_parser("list", parents=[common], help="reported devices and their deliveries")
    listing.add_argument("--detection", help="only this detection (id or name)")
    listing.add_argument("--pending", action="store_true", help="only devices with a pending delivery")
    listing.add_argument("--failed", action="store_true", help="only devices with a failed delivery")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    forget = state_commands.add_parser("forget", parents=[common], help="forget a device: it is reported again")
    forget.add_argument("detection", help="detection id or name")
    forget.add_argument("device", help="device key, DeviceId or DeviceName")
    retry = state_commands.add_parser("retry", parents=[common], help="make failed and backed-off deliveries due now")
    retry.add_argument("--channel", help="only this channel")
    return parser


def _configure_logging(verbose: bool, settings: Settings | None) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("azure", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings is not None:
        redact.install(settings.redactor())


def write_preview(report: RunReport, settings: Settings, folder: Path) -> list[Path]:
    from notifiers import create_notifier

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for channel, messages in report.would_send.items():
        notifier = create_notifier(channel, settings)
        try:
            rendered = [r for message in messages for r in notifier.render(message)]
            if report.digest is not None:
                rendered += notifier.render_digest(report.digest)
            for item in rendered:
                path = folder / item.filename
                path.write_bytes(item.content)
                written.append(path)
        finally:
            notifier.close()
    return written


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if args.now is not None and settings.query_source != "local":
        raise UsageError("--now works only with QUERY_SOURCE=local (a live service has its own clock)")
    report = run_cycle(settings, now=args.now, dry_run=args.dry_run, preview=args.preview is not None)
    print(format_summary(report))
    if args.preview is not None:
        written = write_preview(report, settings, args.preview)
        print(f"Preview: {len(written)} payload file(s) written to {args.preview}")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_validate(settings: Settings) -> int:
    loaded = load_detections(settings.detections_path, settings.detections)
    everything = load_detections(settings.detections_path, every_file=True)
    problems = [str(p) for p in loaded.problems]
    problems += [str(p) for p in everything.problems if str(p) not in problems]
    for detection in everything.detections:
        problems += [str(p) for p in syntax_problems(detection)]
    try:
        suppressions = load_suppressions(settings.suppressions_path)
    except SuppressionError as error:
        problems.append(str(error))
        suppressions = None
    enabled = ", ".join(d.name for d in loaded.detections) or "none"
    print(f"Detections enabled ({len(loaded.detections)}): {enabled}")
    print(f"Detection files checked: {len(everything.detections) + len(everything.problems)}")
    print(f"Query source: {settings.query_source}; state store: {settings.state_store}; "
          f"channels: {', '.join(settings.channels) or 'none'}")
    if suppressions is not None and settings.suppressions_path:
        print(f"Suppressions: {len(suppressions.entries)} entries")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("OK" if not problems else f"{len(problems)} problem(s) found")
    return EXIT_OK if not problems else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings: Settings | None = None
    try:
        settings = Settings.load(settings_file=args.settings)
        _configure_logging(args.verbose, settings)
        if args.command == "run":
            return cmd_run(args, settings)
        if args.command == "validate":
            return cmd_validate(settings)
        store = open_store(settings)
        try:
            return state_command(args, store, settings, json_out=getattr(args, "json", False))
        finally:
            store.close()
    except SettingsError as error:
        _configure_logging(args.verbose, None)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, SuppressionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerError as error:
        print(f"error: ledger: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
