"""The project-trained gender models (``gender-wild-v1``, and ``gender-dlib-v1``, a head on the
dlib backbone): committed file, manifest, card, figures.

- The committed ONNX file's size and sha256 equal the manifest's, and its graph has the
  contract the manifest declares (``images`` [N,3,64,64] or the backbone's ``level1``
  [N,256,4,4] -> ``probabilities`` [N,2], dynamic batch, rows summing to one).
- The model card exists and states the hash, the command and the dev figures.
- On a small, fixed dev sample (100 LFW and 100 UTKFace faces of ``../shared/data/dev``, every
  k-th by file name), the product pipeline with this model reproduces the figures the card lists in
  its ``test-sample`` block within a tolerance (skipped when the dev data is absent).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from daemon import models

NAMES = ("gender-wild-v1", "gender-dlib-v1")
COMMANDS = {"gender-wild-v1": "python -m training.train", "gender-dlib-v1": "python -m training.branch"}
REPO = Path(models.__file__).resolve().parents[2]
MODELS = REPO / "models"
SAMPLE = 100  # faces per folder
TOLERANCE = {"f1": 0.03, "accuracy": 0.03, "auc": 0.02, "mean_p_male_male": 0.03, "mean_p_male_female": 0.03}


@pytest.fixture(scope="module", params=NAMES)
def spec(request: pytest.FixtureRequest) -> models.ModelSpec:
    return models.load_manifest(MODELS).models[request.param]


def card_block(spec: models.ModelSpec) -> dict:
    text = (MODELS / spec.model_card).read_text(encoding="utf-8")
    m = re.search(r"```json test-sample\n(.*?)```", text, re.S)
    assert m, f"{spec.model_card} has no ```json test-sample block"
    return json.loads(m.group(1))


def test_committed_file_matches_manifest(spec: models.ModelSpec) -> None:
    path = MODELS / spec.filename
    assert spec.origin == "project" and spec.role == "gender"
    data = path.read_bytes()
    assert len(data) == spec.bytes
    assert hashlib.sha256(data).hexdigest() == spec.sha256
    assert len(data) < 8 * 1024 * 1024, "a committed model must stay a few MB"
    status = {s.name: s for s in models.verify(MODELS, models.load_manifest(MODELS))}[spec.name]
    assert status.valid, status.detail


def test_graph_contract(spec: models.ModelSpec) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(MODELS / spec.filename), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert inp.name == spec.input.name == ("level1" if spec.backbone else "images")
    assert out.name == spec.outputs[0].name == "probabilities"
    assert tuple(inp.shape[1:]) == spec.input.shape[1:] and not isinstance(inp.shape[0], int)
    assert spec.labels == ("female", "male")
    rng = np.random.default_rng(0)
    x = (rng.uniform(0, 2, (5, *spec.input.shape[1:])) if spec.backbone else rng.uniform(-0.5, 0.5, (5, 3, 64, 64))).astype(np.float32)
    (p,) = sess.run(["probabilities"], {inp.name: x})
    assert p.shape == (5, 2)
    assert np.allclose(p.sum(1), 1, atol=1e-5) and (p >= 0).all()


def test_card_states_hash_command_and_figures(spec: models.ModelSpec) -> None:
    text = (MODELS / spec.model_card).read_text(encoding="utf-8")
    assert spec.sha256 in text
    assert COMMANDS[spec.name] in text
    for word in ("WIDER", "LFW", "UTKFace", "ECE", "ROC-AUC", "children", "occlusion", "resolution"):
        assert word in text, word
    block = card_block(spec)
    assert block["model"] == spec.name and block["sha256"] == spec.sha256


def _sample(folder: Path) -> list[tuple[str, str]]:
    with open(folder / "labels.csv", newline="") as fh:
        rows = [(r["file"], r["gender"]) for r in csv.DictReader(fh) if r["gender"] in ("male", "female")]
    rows.sort()
    step = max(1, len(rows) // SAMPLE)
    return rows[::step][:SAMPLE]  # spread over the folder (UTKFace names start with the age)


def sample_figures(dev: Path, folders: tuple[str, ...] = ("lfw", "utkface"), name: str = NAMES[0]) -> dict:
    """The figures the card's test-sample block lists, measured now with the product pipeline."""
    from dataclasses import replace

    from daemon import metrics
    from daemon.config import GenderConfig, PipelineConfig
    from daemon.pipeline.analyze import load_pipeline
    from daemon.pipeline.images import ImageError

    cfg = replace(PipelineConfig(), gender=GenderConfig(model=name, kind="project-chip", flip_tta=False))
    pipe = load_pipeline(replace(cfg, age=replace(cfg.age, enabled=False)))
    out = {}
    for name in folders:
        y, p, missed = [], [], 0
        for file, gender in _sample(dev / name):
            try:
                res = pipe.analyze_file(dev / name / "images" / file)
            except ImageError:
                missed += 1
                continue
            if not res.faces:
                missed += 1
                continue
            boxes = np.array([f.box for f in res.faces], np.float32)
            i = metrics.match_centre(boxes, res.width, res.height)
            if i < 0:
                missed += 1
                continue
            y.append(gender == "male")
            p.append(res.faces[i].p_male)
        y_arr, p_arr = np.array(y), np.array(p)
        pred = p_arr >= 0.5
        tp, fp, fn = np.sum(pred & y_arr), np.sum(pred & ~y_arr), np.sum(~pred & y_arr)
        out[name] = {
            "faces": int(len(y)), "missed": missed,
            "f1": round(float(2 * tp / (2 * tp + fp + fn)), 4),
            "accuracy": round(float(np.mean(pred == y_arr)), 4),
            "auc": round(float(metrics.roc_auc(y_arr, p_arr)), 4),
            "mean_p_male_male": round(float(p_arr[y_arr].mean()), 4),
            "mean_p_male_female": round(float(p_arr[~y_arr].mean()), 4),
        }
    return out


@pytest.mark.devdata
@pytest.mark.models
def test_figures_on_dev_sample_match_card(spec: models.ModelSpec, dev_data: Path, models_ready: None) -> None:
    expected = card_block(spec)["figures"]
    got = sample_figures(dev_data, tuple(expected), spec.name)
    for folder, exp in expected.items():
        g = got[folder]
        assert abs(g["faces"] - exp["faces"]) <= 2, (folder, g, exp)
        for key, tol in TOLERANCE.items():
            assert abs(g[key] - exp[key]) <= tol, f"{folder} {key}: measured {g[key]}, card {exp[key]} (tolerance {tol})"
