"""Execution providers (``pipeline.providers``, README "GPUs"): validated up front, a requested GPU
provider this host lacks is a WARNING that says what to do, nothing usable or a GPU provider that
does not start is a start-up error, and the provider that runs is in the bundle, the service's
start-up line and ``forensic-gender status``. The GPU comparison runs only where onnxruntime offers
CUDA and skips elsewhere with how to enable it."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from daemon import config
from daemon.config import PipelineConfig
from daemon.pipeline import sessions
from daemon.pipeline.sessions import ModelLoadError, choose_providers
from daemon.service_health import print_status, provider_text

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
HAS_CUDA = CUDA in sessions.available_providers()
ENABLE_GPU = (
    "onnxruntime here does not offer CUDAExecutionProvider; on a host with an NVIDIA GPU run "
    "`pip uninstall -y onnxruntime && pip install -e '.[gpu]'` (driver, CUDA and cuDNN installed) to run it"
)


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        (["gpu", "cpu"], "must name providers from tensorrt, cuda, cpu, got ['gpu']"),
        ([], "must list at least one"),
        (["cuda", "cuda", "cpu"], "must name each provider once"),
        (["cpu", "cuda"], "must keep the order tensorrt, cuda, cpu"),
        (["cuda", 1], "must be a list of strings"),
    ],
)
def test_bad_provider_lists_are_reported_with_their_key_path(providers: list, message: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse({"pipeline": {"providers": providers}}, check_paths=False)
    assert any(p.startswith("pipeline.providers: ") and message in p for p in exc.value.problems), exc.value.problems


def test_provider_lists_parse() -> None:
    assert config.parse({}, check_paths=False).pipeline.providers == ("cpu",)
    assert config.parse({"pipeline": {"providers": ["tensorrt", "cuda", "cpu"]}}, check_paths=False).pipeline.providers == ("tensorrt", "cuda", "cpu")
    assert config.parse({"pipeline": {"providers": "cuda"}}, check_paths=False).pipeline.providers == ("cuda",)


# ------------------------------------------------------------------------------ choosing (pure)


def test_choose_keeps_the_requested_order_of_what_is_offered(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.pipeline.sessions"):
        assert choose_providers(["tensorrt", "cuda", "cpu"], [CPU, CUDA, TRT]) == (TRT, CUDA, CPU)
        assert choose_providers(["cpu"], [CPU, CUDA]) == (CPU,)  # offered but not asked for: not used
    assert not caplog.records


def test_a_missing_gpu_provider_is_an_explicit_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.pipeline.sessions"):
        assert choose_providers(["tensorrt", "cuda", "cpu"], [CUDA, CPU]) == (CUDA, CPU)
        assert choose_providers(["cuda", "cpu"], ["AzureExecutionProvider", CPU]) == (CPU,)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    text = caplog.records[1].getMessage()
    for part in (
        "asks for cuda (CUDAExecutionProvider)",
        f"offers AzureExecutionProvider, {CPU}",
        f"running on {CPU}",
        "pip install 'forensic-gender[gpu]'",
        "pip uninstall -y onnxruntime",
        "driver",
        "pipeline.providers: [cpu]",
    ):
        assert part in text, text


def test_nothing_usable_is_a_start_up_error() -> None:
    with pytest.raises(ModelLoadError) as exc:
        choose_providers(["tensorrt", "cuda"], [CPU])
    text = str(exc.value)
    for part in (
        "pipeline.providers: asked for tensorrt (TensorrtExecutionProvider), cuda (CUDAExecutionProvider)",
        f"offers only {CPU}",
        "forensic-gender[gpu]",
        "set pipeline.providers: [cpu]",
    ):
        assert part in text, text


# ------------------------------------------------------------------------------ the real pipeline on this host


@pytest.mark.skipif(HAS_CUDA, reason="this host's onnxruntime offers CUDA: the CPU-host behaviour is not observable here")
def test_cuda_then_cpu_runs_on_the_cpu_with_a_warning_and_keeps_the_cpu_bundle(
    pipeline,  # noqa: ANN001 - the conftest fixture
    caplog: pytest.LogCaptureFixture,
) -> None:
    from daemon.pipeline.analyze import load_pipeline

    with caplog.at_level(logging.WARNING, logger="daemon.pipeline.sessions"):
        pipe = load_pipeline(PipelineConfig(providers=("cuda", "cpu")))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "asks for cuda (CUDAExecutionProvider)" in warnings[0], warnings  # once, not per model
    assert pipe.providers == [CPU] and "providers" not in pipe.bundle
    for sess in (pipe.detector.session, pipe.gender.session, pipe.backbone.session, pipe.age.session):
        assert sess.providers == (CPU,), sess.name
    # what ran is the CPU, so the results belong to the bundle the default configuration makes
    assert pipe.bundle_key == pipeline.bundle_key
    assert provider_text(pipe.bundle) == "CPU"


@pytest.mark.skipif(HAS_CUDA, reason="this host's onnxruntime offers CUDA")
def test_cuda_alone_without_cuda_is_a_start_up_error(models_ready: None) -> None:
    from daemon.pipeline.analyze import load_pipeline

    with pytest.raises(ModelLoadError, match=r"pipeline.providers: asked for cuda \(CUDAExecutionProvider\); .*forensic-gender\[gpu\]"):
        load_pipeline(PipelineConfig(providers=("cuda",)))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
@pytest.mark.skipif(HAS_CUDA, reason="this host's onnxruntime offers CUDA")
def test_a_gpu_provider_that_does_not_start_is_an_error_not_a_quiet_cpu_session(models_ready: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists CUDA even where its libraries or the driver are missing; the session
    then comes up on the CPU (onnxruntime's own retry). That must stop the start-up, even with
    ``cpu`` listed, so that no worker runs on another provider than the one the host chose."""
    from daemon.pipeline.analyze import load_pipeline

    monkeypatch.setattr(sessions, "available_providers", lambda: [CUDA, CPU])  # "installed", cannot start here
    with pytest.raises(ModelLoadError) as exc:
        load_pipeline(PipelineConfig(providers=("cuda", "cpu")))
    text = str(exc.value)
    assert f"centerface: asked onnxruntime for {CUDA} first, the session runs on ['{CPU}']" in text, text
    assert "did not start" in text and "forensic-gender[gpu]" in text and "leave it out of pipeline.providers" in text


def test_provider_text() -> None:
    assert provider_text({"models": {}}) == "CPU"
    assert provider_text({"providers": [CUDA, CPU]}) == "CUDA (then CPU)"
    assert provider_text({"providers": [TRT, CUDA, CPU]}) == "Tensorrt (then CUDA, CPU)"


def test_status_prints_the_execution_provider_of_each_host() -> None:
    host = {"host": "lab-1", "pid": 7, "last_heartbeat_s": 1.0, "alive": True, "backlog": 0, "rate_per_s": 2.0, "roots": {}}
    doc = {
        "database": "sqlite:///x.db",
        "service": {"running": True, "pid": 7, "hosts": [{**host, "providers": "CUDA (then CPU)"}, {**host, "host": "watcher", "providers": None}]},
        "files": {},
        "backlog": 0,
        "rate": {"last_minute": 0, "last_5_minutes": 0, "per_minute": 0.0},
        "failures": {},
        "quarantined": {},
        "roots": [],
        "configured_roots": [],
    }
    out = io.StringIO()
    print_status(doc, out)
    lines = out.getvalue().splitlines()
    i = next(i for i, line in enumerate(lines) if "host lab-1" in line)
    assert lines[i + 1].strip() == "execution provider: CUDA (then CPU)"
    assert out.getvalue().count("execution provider") == 1  # a host that analyses nothing shows none


@pytest.mark.skipif(HAS_CUDA, reason="this host's onnxruntime offers CUDA")
def test_service_says_which_provider_runs(tmp_path: Path, models_ready: None) -> None:
    """End to end: the warning and the start-up line in the service's log, the provider in
    ``forensic-gender status``; ``[cuda]`` alone stops the start-up with the message."""
    from tests.test_service import ServiceProc, run_cli, write_config

    ev, db = tmp_path / "evidence", tmp_path / "fg.db"
    ev.mkdir()
    cfg = write_config(tmp_path / "fg.yaml", db, [ev], pipeline={"providers": ["cuda", "cpu"]})
    svc = ServiceProc(tmp_path, ["--config", str(cfg)])
    try:
        svc.start().wait_ready()
        log = svc.log()
        assert "pipeline.providers asks for cuda (CUDAExecutionProvider)" in log and "forensic-gender[gpu]" in log, log[-4000:]
        assert "1 worker(s) on CPU" in log, log[-4000:]
        text = run_cli("status", "--config", str(cfg)).stdout
        assert "execution provider: CPU" in text, text
        doc = json.loads(run_cli("status", "--config", str(cfg), "--format", "json").stdout)
        assert doc["service"]["hosts"][0]["providers"] == "CPU"
        assert svc.stop() == 0
        svc.assert_clean_log()
    finally:
        svc.close()
    bad = write_config(tmp_path / "cuda.yaml", tmp_path / "cuda.db", [ev], pipeline={"providers": ["cuda"]})
    r = run_cli("run", "--config", str(bad))
    assert r.returncode != 0 and "pipeline.providers: asked for cuda (CUDAExecutionProvider)" in r.stderr, r.stderr[-4000:]


# ------------------------------------------------------------------------------ on a GPU


@pytest.mark.skipif(not HAS_CUDA, reason=ENABLE_GPU)
def test_gpu_pipeline_matches_the_cpu(pipeline, dev_data: Path) -> None:  # noqa: ANN001 - the conftest fixture
    """The real pipeline on CUDA against the CPU on the same faces. Tolerances allow for cuDNN's
    algorithms (and TF32 on Ampere and later); a decision may differ only next to a band edge."""
    from daemon.pipeline.analyze import load_pipeline

    gpu = load_pipeline(PipelineConfig(providers=("cuda", "cpu")))
    assert gpu.providers[0] == CUDA and gpu.bundle["providers"][0] == CUDA and gpu.bundle_key != pipeline.bundle_key
    g = pipeline.cfg.gender
    edges = np.array([g.threshold - g.uncertain_margin, g.threshold + g.uncertain_margin])
    images = sorted((dev_data / "lfw" / "images").glob("*.jpg"))[:24]
    assert images, f"no images in {dev_data / 'lfw' / 'images'}"
    faces = 0
    for path in images:
        a, b = pipeline.analyze_file(path).faces, gpu.analyze_file(path).faces
        assert len(a) == len(b), path
        for fa, fb in zip(a, b, strict=True):
            faces += 1
            assert np.abs(np.subtract(fa.box, fb.box)).max() <= 2.0, (path, fa.box, fb.box)
            assert abs(fa.p_male - fb.p_male) <= 0.02, (path, fa.p_male, fb.p_male)
            if np.abs(edges - fa.p_male).min() > 0.02:
                assert fa.gender == fb.gender, (path, fa.p_male, fb.p_male)
            if fa.age is not None and fb.age is not None:
                assert abs(fa.age - fb.age) <= 1.0, (path, fa.age, fb.age)
            if fa.descriptor is not None and fb.descriptor is not None:
                da, db = np.frombuffer(fa.descriptor, "<f2").astype(np.float32), np.frombuffer(fb.descriptor, "<f2").astype(np.float32)
                assert np.linalg.norm(da - db) <= 0.02, (path, float(np.linalg.norm(da - db)))
    assert faces >= 10, f"only {faces} faces compared"
