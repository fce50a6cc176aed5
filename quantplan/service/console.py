"""Terminal output for the command line: logging to stderr, rich tables, JSON on stdout, error lines."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from quantplan.progress import stderr_console

stdout = Console()
stderr = stderr_console()  # shared with the progress bars, so log lines print above them

OUR_LOGGERS = ("quantplan",)  # every module logs under quantplan.<layer>.<module>


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Our packages log at INFO (DEBUG with --verbose, WARNING with --quiet) to stderr; libraries at WARNING."""
    # Our own rich progress bars say what is happening; the hub's tqdm bars would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=stderr, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for noisy in ("transformers", "datasets", "huggingface_hub", "filelock", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def print_json(data: Any) -> None:
    """One JSON document on stdout (nothing else goes to stdout in --json mode)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def table(title: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], formats: Mapping[str, str]) -> Table:
    """A rich table; `formats` maps a column to a format spec (e.g. '.3f')."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("scheme", "plan", "model", "data", "layer") else "right")
    for row in rows:
        t.add_row(*(fmt_value(row.get(c), formats.get(c, "")) for c in columns))
    return t


def fmt_value(value: Any, spec: str) -> str:
    """A table cell: "-" for None, numbers with their format spec."""
    if value is None:
        return "-"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)
