"""The `genseg` command line: thin click wrappers over library functions that tests call directly."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import GensegError


class _Group(click.Group):
    """Prints genseg's own errors as one clean line (exit 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GensegError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="genseg")
def main():
    """Generate synthetic brain-MRI slices with a diffusion model and segment tumours with a U-Net.

    Typical flow: `genseg demo-data` or real data -> `genseg prepare` -> `genseg train-seg` /
    `genseg train-diffusion` -> `genseg sample` -> `genseg pipeline`.
    """
