"""The command line every command shares: `--config`, `--set key.path=value`, `--dry-run`.

Problems the user can fix (bad config, bad input) end with a one-line message and exit status 2
instead of a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from common.config import Config, ConfigError, dump_config
from common.config_yaml import load_config
from common.errors import UserError


def build_parser(description: str, config_required: bool = True, example: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=f"example:\n  {example}" if example else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, help="a YAML file in configs/")
    parser.add_argument("--run", help="the run folder (the same as --set run_dir=...; default: checkpoints/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set vae.max_steps=100 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser


def run_cli(doc: str, main: Callable[..., Any], argv: list[str] | None = None,
            add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
            config_required: bool = True) -> None:
    """Parse `--config/--run/--set/--dry-run` (plus a command's own arguments) and call `main(config, args)`.

    `doc` is the command module's docstring: its first line describes the command, its first indented
    line is the example `--help` shows.
    """
    lines = doc.strip().splitlines()
    example = next((line.strip() for line in lines[1:] if line.startswith("    ")), "")
    parser = build_parser(lines[0], config_required, example)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args)
        if args.dry_run:
            print(dump_config(config))
            return
        main(config, args)
    except (ConfigError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def resolve_config(args: argparse.Namespace) -> Config:
    """The config from --config (or, for inference commands, the run folder's saved config)."""
    path = args.config
    run = getattr(args, "run", None)
    if path is None and run:
        saved = Path(run) / "config.yaml"
        path = saved if saved.is_file() else None
    config = load_config(path, args.overrides)
    if run:
        config.run_dir = str(Path(run).expanduser())
    return config
