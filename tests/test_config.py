"""Configuration: the example loads, every problem is reported with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config
from tests.conftest import REPO


def test_example_config_loads_and_matches_defaults() -> None:
    cfg = config.load(REPO / "config.example.yaml")
    default = config.parse({}, base=REPO)
    assert cfg == default, "config.example.yaml documents the defaults"


def test_every_problem_reported_with_its_path(tmp_path: Path) -> None:
    data = {
        "pipeline": {"detector": {"threshold": 2, "max_side": 1000, "tresh": 1}, "gender": {"kind": "cnn"}},
        "watch": {"roots": [{"path": str(tmp_path)}, {"path": str(tmp_path / "missing")}, {"recursive": True}]},
        "service": {"workers": "four"},
        "database": "just-a-file.db",
    }
    with pytest.raises(config.ConfigError) as exc:
        config.parse(data)
    text = str(exc.value)
    for where in ("pipeline.detector.tresh: unknown key", "service.workers: must be int", "watch.roots[2].path: is required"):
        assert where in text, text
    problems = exc.value.problems
    assert any(p.startswith("pipeline.detector.threshold:") for p in problems)
    assert any(p.startswith("pipeline.detector.max_side:") for p in problems)
    assert any(p.startswith("pipeline.gender.kind:") for p in problems)
    assert any(p.startswith("watch.roots[1].path:") and "existing directory" in p for p in problems)
    assert any(p.startswith("database:") for p in problems)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "ev").mkdir()
    f = tmp_path / "c.yaml"
    f.write_text("database: sqlite:///state/r.db\nwatch:\n  roots:\n    - path: ev\n      exclude: '*.mov'\n")
    cfg = config.load(f)
    assert cfg.database == f"sqlite:///{tmp_path / 'state' / 'r.db'}"
    assert cfg.watch.roots[0].path == str(tmp_path / "ev") and cfg.watch.roots[0].exclude == ("*.mov",)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)


def test_video_limits_are_checked_with_their_paths() -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse({"pipeline": {"video": {"budget_seconds": 0, "interval": 0, "max_frames": 0, "max_file_bytes": -1}}})
    got = {p.split(":")[0] for p in exc.value.problems}
    assert got == {"pipeline.video.budget_seconds", "pipeline.video.interval", "pipeline.video.max_frames", "pipeline.video.max_file_bytes"}
