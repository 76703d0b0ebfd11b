"""The research project's EfficientNet as a drop-in gender model, tested with a tiny ONNX graph of
the same signature built here: input ``input.1`` [N, 3, 150, 150] RGB in 0..1 (a loose square
crop around the box), one sigmoid output = p(male)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.config import PipelineConfig, parse
from daemon.pipeline import align
from daemon.pipeline.analyze import load_pipeline
from daemon.pipeline.images import decode
from daemon.pipeline.reading import read_file
from daemon.pipeline.sessions import ModelLoadError

W = np.array([[6.0], [0.0], [-6.0]], np.float32)  # p(male) = sigmoid(6 * (mean R - mean B) + 0.1)
B = np.array([0.1], np.float32)


def seed_graph(path: Path, *, outputs: int = 1) -> Path:
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 150, 150])
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["zb"]),
        helper.make_node("Sigmoid", ["zb"], ["p"]),
    ]
    outs = [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])]
    if outputs == 2:
        nodes.append(helper.make_node("Identity", ["zb"], ["logit"]))
        outs.append(helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1]))
    graph = helper.make_graph(nodes, "seed", [x], outs, [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_seed_model_config_is_validated(tmp_path: Path) -> None:
    cfg = parse({"pipeline": {"gender": {"model": "efnet_b0.onnx", "kind": "seed-efficientnet"}}}, base=tmp_path)
    assert cfg.pipeline.gender.model == str(tmp_path / "efnet_b0.onnx")


def test_seed_model_gives_the_research_crop_and_sigmoid(tmp_path: Path, dev_data: Path, models_ready: None) -> None:
    path = seed_graph(tmp_path / "efnet_b0.onnx")
    base = PipelineConfig()
    cfg = replace(base, gender=replace(base.gender, model=str(path), kind="seed-efficientnet"))
    pipe = load_pipeline(cfg)
    img = dev_data / "lfw" / "images" / "Abdullah_0001.jpg"
    res = pipe.analyze_file(img)
    (face,) = res.faces
    # what the research project's pipeline computes for this box: loose square crop, RGB / 255
    bgr = decode(read_file(img).data).bgr
    crop = align.loose_crops(bgr, np.array([face.box]), 150)[0]
    rgb_mean = crop[..., ::-1].reshape(-1, 3).astype(np.float64).mean(0) / 255
    expect = 1 / (1 + np.exp(-(6 * (rgb_mean[0] - rgb_mean[2]) + 0.1)))
    assert face.p_male == pytest.approx(expect, abs=1e-4)
    assert face.p_female == pytest.approx(1 - expect, abs=1e-4)
    assert pipe.bundle["gender"]["kind"] == "seed-efficientnet" and len(pipe.bundle["models"]["gender"]) == 64


def test_seed_model_with_wrong_signature_is_refused(tmp_path: Path, models_ready: None) -> None:
    path = seed_graph(tmp_path / "two-outputs.onnx", outputs=2)
    base = PipelineConfig()
    cfg = replace(base, gender=replace(base.gender, model=str(path), kind="seed-efficientnet"))
    with pytest.raises(ModelLoadError, match="exactly one output"):
        load_pipeline(cfg)
