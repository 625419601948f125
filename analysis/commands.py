"""`leadtune report`, `evaluate`, `export` and `label` (filled in by the delivery work)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    return None
