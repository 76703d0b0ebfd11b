"""``forensic-gender evaluate``: the labelled-data format, scoring, the report, and an end-to-end
run of the real pipeline on a small sample of the dev data."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import evaluate as ev
from daemon import report as rep
from daemon.cli import main
from daemon.config import PipelineConfig, parse


def make_folder(root: Path, header: list[str], rows: list[list], files: dict[str, bytes] | None = None) -> Path:
    """A labelled folder: ``labels.csv`` from rows, and the named (dummy) image files."""
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    names = files if files is not None else {r[0]: b"x" * 10 for r in rows}
    for name, data in names.items():
        p = root / "images" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


SCENE_HEADER = ["file", "gender", "age", "x1", "y1", "x2", "y2", "perceived_age_group"]


# --- the labelled-data format ----------------------------------------------------------------

def test_scene_folder_is_read(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "scenes", SCENE_HEADER, [
        ["a/1.jpg", "male", "", 10, 10, 30, 40, "Adult"],
        ["a/1.jpg", "", "", 50, 10, 60, 20, ""],
        ["2.jpg", "Female", "33", 0, 0, 100, 100, ""],
    ])
    ls = ev.load_labelled(d)
    assert (ls.name, ls.kind, len(ls.images), ls.faces, ls.unlisted) == ("scenes", "scene", 2, 3, 0)
    one = ls.images[0]
    assert one.file == "a/1.jpg" and [f.box for f in one.faces] == [(10, 10, 30, 40), (50, 10, 60, 20)]
    assert [f.gender for f in one.faces] == ["male", None] and one.faces[0].age_group == "Adult"
    assert one.faces[0].width == 20 and one.faces[0].row == 2
    assert ls.images[1].faces[0].gender == "female" and ls.images[1].faces[0].age == 33.0


def test_crop_folder_is_read(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "crops", ["file", "gender", "age"], [["x.jpg", "male", "12"], ["y.jpg", "female", ""]])
    (d / "images" / "unlisted.jpg").write_bytes(b"z")
    ls = ev.load_labelled(d)
    assert ls.kind == "crops" and ls.faces == 2 and ls.unlisted == 1
    assert ls.images[0].faces[0].box is None and ls.images[0].faces[0].age == 12.0


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "bad", SCENE_HEADER, [
        ["1.jpg", "man", "", 0, 0, 10, 10, ""],        # line 2: bad gender
        ["1.jpg", "male", "-3", 0, 0, 10, 10, ""],     # line 3: bad age
        ["1.jpg", "male", "", 10, 0, 5, 10, ""],       # line 4: x2 <= x1
        ["../evil.jpg", "", "", 0, 0, 1, 1, ""],       # line 5: escapes images/
        ["gone.jpg", "", "", 0, 0, 1, 1, ""],          # line 6: no such file
    ], files={"1.jpg": b"x"})
    with pytest.raises(ev.EvaluationError) as info:
        ev.load_labelled(d)
    msg = str(info.value)
    assert len(info.value.problems) == 5, info.value.problems
    for where, what in [("line 2", "'gender' must be male, female or blank, got 'man'"), ("line 3", "'age' must be"),
                        ("line 4", "x2 > x1"), ("line 5", "without '..'"), ("line 6", "images/gone.jpg does not exist")]:
        assert f"labels.csv {where}: " in msg and what in msg


@pytest.mark.parametrize("header, rows, match", [
    (["file", "gender", "x1", "y1"], [["1.jpg", "male", 1, 2]], "all of x1, y1, x2, y2 or none"),
    (["name", "gender"], [["1.jpg", "male"]], "must have a 'file' column"),
    (["file", "gender"], [["1.jpg", "male"], ["1.jpg", "female"]], "one row per image"),
    (["file", "gender"], [], "has no rows"),
])
def test_malformed_label_files(tmp_path: Path, header: list, rows: list, match: str) -> None:
    d = make_folder(tmp_path / "d", header, rows, files={"1.jpg": b"x"})
    with pytest.raises(ev.EvaluationError, match=match):
        ev.load_labelled(d)


def test_missing_parts_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ev.EvaluationError, match="must be a folder holding images/ and labels.csv"):
        ev.load_labelled(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "labels.csv").write_text("file\n")
    with pytest.raises(ev.EvaluationError, match="missing images/"):
        ev.load_labelled(tmp_path / "half")


def test_data_hash_follows_labels_and_image_sizes(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "d", ["file", "gender"], [["1.jpg", "male"], ["2.jpg", "female"]])
    h0 = ev.load_labelled(d).data_hash
    assert ev.load_labelled(d).data_hash == h0
    (d / "images" / "2.jpg").write_bytes(b"y" * 11)
    h1 = ev.load_labelled(d).data_hash
    assert h1 != h0
    (d / "labels.csv").write_text("file,gender\n1.jpg,male\n2.jpg,male\n")
    assert ev.load_labelled(d).data_hash not in (h0, h1)


def test_select_spreads_evenly_and_is_deterministic(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "d", ["file"], [[f"{i:02d}.jpg"] for i in range(10)])
    imgs = ev.load_labelled(d).images
    assert [i.file for i in ev.select(imgs, 3)] == ["00.jpg", "04.jpg", "09.jpg"]
    assert ev.select(imgs, None) == list(imgs) == ev.select(imgs, 50)
    assert len(ev.select(imgs, 1)) == 1


# --- scoring on hand-made predictions ---------------------------------------------------------

def face(box: tuple, score: float, p: float, age: float | None = None) -> ev.PredictedFace:
    return ev.PredictedFace(tuple(float(v) for v in box), score, p, age)  # type: ignore[arg-type]


def test_scene_scoring_by_hand(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "s", SCENE_HEADER, [
        ["1.jpg", "male", "", 0, 0, 40, 40, ""],       # found (p 0.9): right
        ["1.jpg", "female", "", 100, 0, 115, 15, ""],  # 15 px: found only above threshold 0.3 (score 0.4)
        ["1.jpg", "", "", 200, 0, 208, 8, ""],         # 8 px, no gender: missed
        ["2.jpg", "female", "", 0, 0, 70, 70, ""],     # found, p 0.55: wrong at 0.5, uncertain with the band
    ])
    ls = ev.load_labelled(d)
    preds = [
        ev.ImagePrediction("1.jpg", (face((0, 0, 40, 40), 0.9, 0.9), face((101, 0, 115, 15), 0.4, 0.2),
                                     face((500, 500, 520, 520), 0.8, 0.5)), 640, 480),
        ev.ImagePrediction("2.jpg", (face((2, 2, 70, 70), 0.95, 0.55),), 640, 480),
    ]
    r = ev.score(ls, ls.images, preds, ev.ScoreParams(0.35, 0.5, 0.1))
    det = r["detection"]
    assert (det["labelled"], det["matched"], det["detections"]) == (4, 3, 4)
    assert det["recall"] == 0.75 and det["precision_lower_bound"] == 0.75 and det["detections_per_image"] == 2.0
    assert det["by_width"]["<10"] == {"labelled": 1, "matched": 0, "recall": 0.0}
    assert det["by_width"][">=20"] == {"labelled": 2, "matched": 2, "recall": 1.0}
    assert det["by_width"]["<20"]["labelled"] == 2
    g = r["gender"]
    assert g["labelled"] == 3 and g["found"] == 3
    assert g["confusion"] == {"male": {"male": 1, "female": 0, "uncertain": 0, "missed": 0},
                              "female": {"male": 0, "female": 1, "uncertain": 1, "missed": 0}}
    assert g["metrics"]["tp"] == 1 and g["metrics"]["fp"] == 1 and g["metrics"]["precision"] == 0.5
    assert g["uncertain_share"] == pytest.approx(1 / 3)
    assert set(g["by_width"]) == {"10-19", "32-63", ">=64"}
    # Re-scored at a higher detection threshold, the 15 px face (score 0.4) is lost.
    r2 = ev.score(ls, ls.images, preds, ev.ScoreParams(0.5, 0.5, 0.1))
    assert r2["detection"]["matched"] == 2 and r2["detection"]["detections"] == 3
    assert r2["gender"]["confusion"]["female"]["missed"] == 1
    assert r2["gender"]["with_misses"]["female_recall"] == 0.0


def test_crop_scoring_uses_the_face_at_the_centre(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "c", ["file", "gender", "age"], [["a.jpg", "male", "15"], ["b.jpg", "female", "40"], ["c.jpg", "male", ""]])
    ls = ev.load_labelled(d)
    preds = [
        ev.ImagePrediction("a.jpg", (face((0, 0, 20, 20), 0.99, 0.1, 30.0), face((20, 20, 80, 80), 0.9, 0.8, 16.0)), 100, 100),
        ev.ImagePrediction("b.jpg", (face((0, 0, 30, 30), 0.9, 0.9, 20.0),), 100, 100),  # off-centre: the labelled face is missed
        ev.ImagePrediction("c.jpg", (), reason="corrupt", error="broken"),
    ]
    r = ev.score(ls, ls.images, preds, ev.ScoreParams(0.35, 0.5, 0.1))
    assert r["failed_images"] == {"corrupt": 1}
    assert r["detection"]["matched"] == 1 and r["detection"]["labelled"] == 3 and "by_width" not in r["detection"]
    assert r["gender"]["confusion"]["male"] == {"male": 1, "female": 0, "uncertain": 0, "missed": 1}
    assert r["age"]["labelled"] == 2 and r["age"]["estimated"] == 1 and r["age"]["mae"] == pytest.approx(1.0)
    assert r["age"]["minor_tp"] == 1
    assert list(r["gender"]["by_age_group"]) == ["13-17", "30-44"]


# --- the report ------------------------------------------------------------------------------

def small_report(tmp_path: Path) -> dict:
    d = make_folder(tmp_path / "c", ["file", "gender"], [["a.jpg", "male"], ["b.jpg", "female"]])
    ls = ev.load_labelled(d)
    preds = [ev.ImagePrediction("a.jpg", (face((10, 10, 90, 90), 0.9, 0.8),), 100, 100, seconds={"detect": 0.01}),
             ev.ImagePrediction("b.jpg", (face((10, 10, 90, 90), 0.9, 0.3),), 100, 100)]
    res = ev.score(ls, ls.images, preds, ev.ScoreParams(0.35, 0.5, 0.1))
    res.update(name="c", path=str(d), kind=ls.kind, labels_sha256=ls.labels_sha256, data_hash=ls.data_hash, images_total=2,
               faces_total=2, unlisted_images=0, wall_seconds=1.0, images_per_second=2.0)
    cfg = parse({}, check_paths=False)
    from dataclasses import asdict
    return {"run": ev.run_info(cfg, None), "pipeline": asdict(cfg.pipeline), "params": {}, "limit": None, "reused_from": None,
            "trained_on": "somewhere <b>", "bundle": {"models": {"gender": "ab" * 32}}, "bundle_key": "k", "folders": [res]}


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    report = small_report(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    files = rep.write_all(report, out)
    assert files == ["report.json", "report.md", "report.html"]
    assert not list(out.glob("*.png"))
    assert "matplotlib is not installed" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["notes"] == [rep.NO_MATPLOTLIB]
    page = (out / "report.html").read_text()
    assert "matplotlib is not installed" in page and "somewhere &lt;b&gt;" in page


def test_report_with_figures_is_self_contained(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = small_report(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    files = rep.write_all(report, out)
    assert files == ["report.json", "report.md", "report.html", "roc.png", "reliability.png"]
    for png in ("roc.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    md = (out / "report.md").read_text()
    assert rep.summary_text(report).split("\n\n", 1)[1] in md  # the printed table is the report's
    assert "| Method | Trained on | Precision | Recall | F1 |" in md and "![roc.png](roc.png)" in md


def test_summary_table_shape(tmp_path: Path) -> None:
    text = rep.summary_text(small_report(tmp_path))
    lines = text.splitlines()
    assert lines[0].startswith("## c: 2 images (crops), 2 labelled faces, data ")
    assert lines[2] == "| " + " | ".join(rep.SUMMARY_HEADER) + " |"
    found, misses = lines[4].split(" | "), lines[5].split(" | ")
    assert "faces found (2/2)" in found[0] and found[2:5] == ["1.000", "1.000", "1.000"]
    assert "misses as errors (2)" in misses[0]


# --- reuse checks and the command line ---------------------------------------------------------

def test_reuse_refuses_what_cannot_be_rescored(tmp_path: Path) -> None:
    d = make_folder(tmp_path / "c", ["file", "gender"], [["a.jpg", "male"]])
    ls = ev.load_labelled(d)
    from dataclasses import asdict
    base = PipelineConfig()
    doc = {"version": ev.PREDICTIONS_VERSION, "data_hash": ls.data_hash, "pipeline": asdict(base), "images": [{"file": "a.jpg"}]}
    ok = replace(base, detector=replace(base.detector, threshold=0.5), gender=replace(base.gender, uncertain_margin=0.2))
    assert ev._check_reuse(doc, ls, ok, ls.images, Path("p.json")) == []
    bad = replace(base, detector=replace(base.detector, threshold=0.3, max_side=640))
    problems = ev._check_reuse(doc, ls, bad, ls.images, Path("p.json"))
    assert any("max_side (1280 then, 640 now)" in p for p in problems)
    assert any("can only be raised" in p for p in problems)
    assert ev._check_reuse({**doc, "data_hash": "0" * 64}, ls, base, ls.images, Path("p.json"))[0].startswith("p.json: made on different data")


def test_cli_skips_missing_data_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gone = str(tmp_path / "no-such-dev")
    assert main(["evaluate", gone, "--skip-missing", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert "not found, skipped" in out.err and "nothing to evaluate" in out.out
    assert main(["evaluate", gone, "--out", str(tmp_path / "r")]) == 2
    assert "must be a folder holding images/ and labels.csv" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_refuses_output_inside_the_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = make_folder(tmp_path / "c", ["file", "gender"], [["a.jpg", "male"]])
    assert main(["evaluate", str(d), "--out", str(d / "report")]) == 2
    assert "inside the labelled folder" in capsys.readouterr().err
    assert not (d / "report").exists()


# --- end to end on the dev data ----------------------------------------------------------------

@pytest.mark.devdata
@pytest.mark.models
def test_evaluate_dev_sample_end_to_end(dev_data: Path, models_ready: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    lfw, wider = dev_data / "lfw", dev_data / "wider"
    # 20 LFW crops and 3 WIDER scenes (--limit applies per folder: 20 for both, WIDER sampled separately below).
    assert main(["evaluate", str(lfw), "--limit", "20", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert main(["evaluate", str(wider), "--limit", "3", "--out", str(tmp_path / "wider"), "--no-progress"]) == 0
    printed_w = capsys.readouterr().out
    for d in (out, tmp_path / "wider"):
        for name in ("report.json", "report.md", "report.html"):
            assert (d / name).stat().st_size > 500
    report = json.loads((out / "report.json").read_text())
    (f,) = report["folders"]
    # Counts match the labels read independently.
    rows = list(csv.DictReader((lfw / "labels.csv").read_text(encoding="utf-8").splitlines()))
    chosen = {i.file for i in ev.select(ev.load_labelled(lfw).images, 20)}
    want = [r for r in rows if r["file"] in chosen]
    assert f["images"] == 20 and f["labelled_faces"] == 20 and f["images_total"] == len(rows)
    g = f["gender"]
    assert g["labelled"] == sum(1 for r in want if r["gender"])
    conf = g["confusion"]
    assert sum(conf["male"].values()) == sum(1 for r in want if r["gender"] == "male")
    assert sum(conf["female"].values()) == sum(1 for r in want if r["gender"] == "female")
    assert g["found"] == f["detection"]["matched"] == 20 - conf["male"]["missed"] - conf["female"]["missed"]
    # Sane numbers for clean LFW crops.
    assert f["detection"]["recall"] >= 0.9 and g["metrics"]["accuracy"] >= 0.8 and g["roc_auc"] >= 0.85
    assert 0 <= f["calibration"]["ece"] <= 0.3 and sum(b["n"] for b in f["calibration"]["bins"]) == g["found"]
    assert report["bundle_key"] and report["run"]["host"] and report["run"]["version"]
    # What was printed is the markdown report's summary table.
    md = (out / "report.md").read_text()
    table = [ln for ln in printed.splitlines() if ln.startswith("| gender-")]
    assert len(table) == 2 and all(ln in md for ln in table)

    wr = json.loads((tmp_path / "wider" / "report.json").read_text())["folders"][0]
    wrows = list(csv.DictReader((wider / "labels.csv").read_text(encoding="utf-8").splitlines()))
    wchosen = {i.file for i in ev.select(ev.load_labelled(wider).images, 3)}
    assert wr["images"] == 3 and wr["labelled_faces"] == sum(1 for r in wrows if r["file"] in wchosen)
    assert wr["detection"]["by_width"][">=10"]["labelled"] == sum(
        1 for r in wrows if r["file"] in wchosen and float(r["x2"]) - float(r["x1"]) >= 10)
    assert 0 < wr["detection"]["recall"] <= 1 and wr["detection"]["precision_lower_bound"] > 0.5
    assert "wider: 3 of 188 images (scene)" in printed_w or "wider: 3 of" in printed_w

    # Re-scoring the saved predictions under the same configuration gives exactly the same figures.
    assert main(["evaluate", str(wider), "--limit", "3", "--out", str(tmp_path / "same"), "--reuse", str(tmp_path / "wider"),
                 "--no-progress"]) == 0
    same = json.loads((tmp_path / "same" / "report.json").read_text())["folders"][0]
    for key in ("detection", "gender", "calibration", "roc", "age", "labelled_faces"):
        assert same.get(key) == wr.get(key), key

    # Re-scoring with a higher threshold and a wider band runs no model.
    cfg = tmp_path / "rescore.yaml"
    cfg.write_text("pipeline:\n  detector:\n    threshold: 0.6\n  gender:\n    uncertain_margin: 0.2\n")
    assert main(["evaluate", str(wider), "--limit", "3", "--out", str(tmp_path / "re"), "--reuse", str(tmp_path / "wider"),
                 "--config", str(cfg), "--no-progress"]) == 0
    rr = json.loads((tmp_path / "re" / "report.json").read_text())
    r2 = rr["folders"][0]
    assert rr["reused_from"] and r2["labelled_faces"] == wr["labelled_faces"]
    assert r2["detection"]["detections"] <= wr["detection"]["detections"] and r2["detection"]["matched"] <= wr["detection"]["matched"]
    if "gender" in wr:
        assert r2["gender"]["uncertain_share"] >= wr["gender"]["uncertain_share"]
    cfg.write_text("pipeline:\n  detector:\n    threshold: 0.2\n")
    capsys.readouterr()
    assert main(["evaluate", str(wider), "--limit", "3", "--out", str(tmp_path / "re2"), "--reuse", str(tmp_path / "wider"),
                 "--config", str(cfg), "--no-progress"]) == 2
    assert "can only be raised" in capsys.readouterr().err
    assert not math.isnan(r2["detection"]["recall"])
