"""Argument helpers shared by the command modules (``daemon.cli`` and the modules that register
their own commands): the ``--config``/``--db`` options and the configuration they name. Nothing
here prints or exits: configuration problems are raised as :class:`~daemon.config.ConfigError`
for the CLI to report."""

from __future__ import annotations

import argparse
from dataclasses import replace

from daemon import config as config_mod


def add_config_args(p: argparse.ArgumentParser, *, db: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    if db:
        p.add_argument("--db", metavar="URL", help="database URL (overrides the configuration), e.g. sqlite:///var/forensic-gender.db")


def load_config(args: argparse.Namespace, *, check_paths: bool = True) -> config_mod.Config:
    """The configuration named by ``--config`` (or defaults), with ``--db`` applied."""
    cfg = config_mod.load(getattr(args, "config", None), check_paths=check_paths)
    if getattr(args, "db", None):
        cfg = replace(cfg, database=config_mod.parse({"database": args.db}, check_paths=False).database)
    return cfg
