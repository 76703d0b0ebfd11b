"""Every command and every configuration key is documented (the rule runs instead of living in
prose): each sub-command of ``forensic-gender`` is named as ``forensic-gender COMMAND`` in the
README or docs/, each configuration key is in config.example.yaml (the commented reference
of every key) with the same default, and every file state, failure reason and rescan reason
(:mod:`daemon.states`) is named in the README or docs/ as `code`."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from daemon import config
from daemon.cli import build_parser
from daemon.states import FileState, Reason, Rescan, VideoCut

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # argparse has no public walk
    return sorted(subs[0].choices) if subs else []


def test_every_command_is_documented() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    missing = [c for c in _commands(build_parser()) if not re.search(rf"forensic-gender(\s+\$\w+)?\s+{re.escape(c)}\b", text)]
    assert not missing, f"commands not shown as `forensic-gender COMMAND` in README.md or docs/*.md: {missing}"


def _defaults(cls: Any, prefix: str = "") -> dict[str, Any]:
    """Key path -> default of every leaf of a configuration dataclass (lists of sections skipped)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            out.update(_defaults(type(value), f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_every_config_key_is_in_the_example_with_its_default() -> None:
    example = yaml.safe_load((REPO / "config.example.yaml").read_text(encoding="utf-8"))
    written = _flatten(example)
    expected = _defaults(config.Config)
    missing = sorted(set(expected) - set(written))
    assert not missing, f"configuration keys missing from config.example.yaml: {missing}"
    unknown = sorted(set(written) - set(expected))
    assert not unknown, f"config.example.yaml has keys the configuration does not know: {unknown}"
    # the example parses and its values are the defaults, except where it says otherwise on purpose
    config.parse(example, check_paths=False)
    differ = {
        k: (written[k], expected[k])
        for k in expected
        if k not in ("service.host_id", "watch.roots")
        and written[k] != expected[k]
        and not (isinstance(expected[k], tuple) and list(expected[k]) == written[k])
    }
    assert not differ, f"config.example.yaml shows other values than the defaults (example, default): {differ}"


def test_every_state_and_reason_is_documented() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    missing = [f"{e.__name__}.{m.name}" for e in (FileState, Reason, Rescan, VideoCut) for m in e if f"`{m.value}`" not in text]
    assert not missing, f"name each in README.md or docs/*.md as `value` (what it means, what to do): {missing}"
