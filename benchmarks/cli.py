"""Arguments and entry of `alpha-jit bench` (the command in alpha_jit/cli.py is a thin entry)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare `alpha-jit bench`'s options on its subparser."""


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks `args` asks for; returns the exit status."""
    raise NotImplementedError("alpha-jit bench is being built")
