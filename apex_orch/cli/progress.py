"""Progress output shared by long-running commands (quantize, release)."""

from __future__ import annotations

import sys
import time

import click


class Progress:
    """Tool records ("[i/n] tensor") as one refreshed line on a terminal, one line every
    `interval` seconds otherwise (logs, CI); every other message on its own line."""

    def __init__(self, quiet: bool, interval: float = 5.0):
        self.quiet = quiet
        self.interval = interval
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if msg.startswith("["):
            if self.tty:
                click.echo(f"\r\033[K  {msg}", nl=False, err=True)
                return
            now = time.monotonic()
            if now - self.last < self.interval:
                return
            self.last = now
            click.echo(f"  {msg}", err=True)
            return
        if self.tty:
            click.echo("\r\033[K", nl=False, err=True)
        click.echo(msg, err=True)
