"""onnxruntime sessions: the only module that imports onnxruntime.

A :class:`Session` checks the graph's signature against what the caller expects when it is
loaded (so a wrong file fails at start-up, not on the first evidence file), pins the thread
count, checks that the provider it got is the one it asked for, and exposes one ``run``.

Denormal weights: a float32 weight below 1.18e-38 in magnitude (a *subnormal*) costs the CPU a
microcode assist on every multiplication it takes part in. ``age-v1`` holds 6,667 of them and
``gender-v1`` 145 (converted from dlib); they made ``age-v1`` run 5-6x slower than the same
network without them (12.8 vs 2.2 ms per face on this machine, benchmarks/README.md). A session
therefore loads the graph with such weights set to zero (:func:`flush_denormals`); their
contribution to any output is below float32 resolution (outputs compared bit for bit on test
chips). The file on disk, and the hash the bundle records, are unchanged.

Execution providers (``pipeline.providers``, README "GPUs"): :func:`choose_providers` keeps the
requested providers this onnxruntime build offers, in the requested order, and says at start-up,
as a WARNING, which requested ones it lacks and how to get them; none left is a start-up error.
Every session must then run on the first one chosen: a provider that the build offers but cannot
start (no driver, CUDA or cuDNN libraries missing, GPU memory full) is a start-up error too, and
onnxruntime's own retry on the CPU (at load and at run time) is turned off. So the provider that
runs is decided once per host, the same in every worker, and never changes silently.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"
# pipeline.providers names -> onnxruntime's execution providers, in the only order that makes
# sense (a provider takes every node it can before the next one is asked)
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": PROVIDER}
GPU_HELP = (
    "install onnxruntime's GPU build with `pip uninstall -y onnxruntime && pip install 'forensic-gender[gpu]'` "
    "(onnxruntime and onnxruntime-gpu must not be installed side by side) on a host with the NVIDIA driver and "
    "the CUDA and cuDNN libraries that onnxruntime-gpu release needs"
)


class ModelLoadError(Exception):
    """A model file could not be loaded or does not have the expected signature."""


class ModelOutputError(Exception):
    """A model produced output that is not what its contract says (shape, range, NaN)."""


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (not a promise that they start)."""
    return list(ort.get_available_providers())


def choose_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> tuple[str, ...]:
    """The onnxruntime providers to ask for: the ``requested`` ones (``pipeline.providers``
    names) that ``available`` offers, in the requested order. Each requested one that is not
    offered is logged as a WARNING; none left raises :class:`ModelLoadError`."""
    have = available_providers() if available is None else list(available)
    wanted = [(name, PROVIDERS[name]) for name in requested]
    chosen = tuple(ep for _, ep in wanted if ep in have)
    missing = [f"{name} ({ep})" for name, ep in wanted if ep not in have]
    offered = ", ".join(have) or "none"
    if not chosen:
        raise ModelLoadError(
            f"pipeline.providers: asked for {', '.join(missing)}; onnxruntime {ort.__version__} offers only {offered}. "
            f"To run on the GPU, {GPU_HELP}; to run on the CPU, set pipeline.providers: [cpu]"
        )
    if missing:
        log.warning(
            "pipeline.providers asks for %s, which onnxruntime %s does not offer (it offers %s): running on %s. "
            "To use the GPU, %s; to silence this warning, set pipeline.providers: [cpu]",
            ", ".join(missing), ort.__version__, offered, ", ".join(chosen), GPU_HELP,
        )
    return chosen


class Session:
    """One onnxruntime inference session with a checked signature."""

    def __init__(
        self,
        path: Path,
        *,
        inputs: dict[str, int],
        outputs: Sequence[str] | None,
        threads: int = 1,
        name: str = "",
        providers: Sequence[str] = (PROVIDER,),
    ) -> None:
        """Load ``path``; ``inputs`` maps each expected input name to its rank, ``outputs``
        lists the output names that must exist (None: all of the graph's outputs).
        ``providers``: onnxruntime provider names (:func:`choose_providers`); the session must
        run on the first."""
        self.name = name or Path(path).name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Memory (benchmarks/bench.py --memcheck; figures in benchmarks/README.md). The
        # detector's input changes shape with every image. With the arena off every large
        # activation is mmap-ed and faulted in again on every run (~35% of the detector's time
        # went to system CPU); a memory *pattern* (one pre-planned block per input shape) and
        # per-session arenas that grow region by region made a worker's memory climb with each
        # new shape (0.65 GiB after a mix of sizes). So: no patterns, and one arena for all the
        # sessions of the process whose first region (ARENA_INITIAL_BYTES, reserved, only
        # touched pages count) holds everything the detector needs at max_side 1280, so that
        # every shape reuses the same pages (0.47 GiB after the same mix).
        opts.enable_cpu_mem_arena = True
        opts.enable_mem_pattern = False
        if _shared_arena():
            opts.add_session_config_entry("session.use_env_allocators", "1")
        try:
            model = flush_denormals(path)
            self._session = ort.InferenceSession(model if model is not None else str(path), sess_options=opts,
                                                 providers=list(providers))
            # no quiet retry on the CPU when a GPU provider fails at run time: the file fails
            # with its error instead (a retry already made at load time is caught below)
            self._session.disable_fallback()
            if model is not None:
                # onnxruntime's wrapper keeps the serialized model "indefinitely" (its own TODO),
                # only to rebuild the session on a provider fallback, which is disabled above:
                # let the bytes go (10.7 MB for age-v1 in every worker).
                self._session._model_bytes = None
            del model
        except Exception as err:  # onnxruntime raises several unrelated types
            raise ModelLoadError(
                f"{self.name}: could not load {path} as an ONNX model ({err}); "
                "check it with `forensic-gender models verify`"
            ) from err
        got = self._session.get_providers()
        if not got or got[0] != providers[0]:
            if providers[0] == PROVIDER:
                raise ModelLoadError(f"{self.name}: asked for {PROVIDER}, onnxruntime gave {got}")
            raise ModelLoadError(
                f"{self.name}: asked onnxruntime for {providers[0]} first, the session runs on {got}: "
                f"{providers[0]} is installed but did not start (see onnxruntime's message above: driver, CUDA or "
                f"cuDNN libraries, GPU memory); {GPU_HELP}, or leave it out of pipeline.providers"
            )
        self.providers = tuple(got)
        have_in = {i.name: len(i.shape) for i in self._session.get_inputs()}
        have_out = [o.name for o in self._session.get_outputs()]
        problems = [
            f"input {k!r} of rank {r}" for k, r in inputs.items() if have_in.get(k) != r
        ] + [f"output {k!r}" for k in (outputs or ()) if k not in have_out]
        if problems:
            raise ModelLoadError(
                f"{self.name}: {path} must have {', '.join(problems)}; it has inputs {have_in} "
                f"and outputs {have_out}. Is this the right model file for this role?"
            )
        # parsing the graph here and in onnxruntime leaves freed pages in the C heap, which later
        # allocations would fragment: hand them back now (-35 MB of RSS per worker, measured)
        _trim_heap()
        self.input_shapes = {i.name: list(i.shape) for i in self._session.get_inputs()}
        self.output_names = list(outputs) if outputs is not None else have_out

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; returns the expected outputs in the order given at load time."""
        return self._session.run(self.output_names, feeds)


# The first region of the shared arena: a 1280x1280 detector input and the classifiers fit in it
# (384 MiB did not: a second region followed, with its own pages). Virtual until touched.
ARENA_INITIAL_BYTES = 512 << 20


@functools.cache  # registered once per process (onnxruntime's environment is global)
def _shared_arena() -> bool:
    """Register one CPU arena for every session of this process (no cap; grows by powers of two
    beyond its first region, for detector inputs larger than max_side 1280 allows)."""
    try:
        cfg = ort.OrtArenaCfg(0, 0, ARENA_INITIAL_BYTES, -1)  # max_mem 0: none; 0: kNextPowerOfTwo
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, cfg)
        return True
    except Exception as err:  # noqa: BLE001 - an older onnxruntime: each session keeps its own arena
        log.debug("no shared onnxruntime arena (%s); sessions use their own", err)
        return False


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc), after parsing a model."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def flush_denormals(path: str | Path) -> bytes | None:
    """The model at ``path`` serialized with its subnormal float32 weights set to zero, or None
    when it has none (or cannot be parsed: then onnxruntime reports the problem itself)."""
    import onnx  # here, not at the top: its import costs every command 0.6 s of start-up
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception:  # noqa: BLE001 - not an ONNX file: the session's own error is clearer
        return None
    tiny = np.finfo(np.float32).tiny
    tensors = list(model.graph.initializer) + [
        a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value"
    ]
    flushed = 0
    for t in tensors:
        if t.data_type != onnx.TensorProto.FLOAT or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        a = numpy_helper.to_array(t)
        sub = (a != 0) & (np.abs(a) < tiny)
        if sub.any():
            a = np.where(sub, np.float32(0), a).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            flushed += int(sub.sum())
    if not flushed:
        return None
    log.debug("%s: %d subnormal weights set to zero", path, flushed)
    return model.SerializeToString()


def check_probabilities(p: np.ndarray, rows: int, cols: int, where: str, *, rows_sum_to_one: bool) -> np.ndarray:
    """Validate a model's probability output before anyone uses it."""
    if p.shape != (rows, cols):
        raise ModelOutputError(f"{where}: output must have shape ({rows}, {cols}), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ModelOutputError(f"{where}: output has NaN or infinite values")
    if p.size and (p.min() < -1e-4 or p.max() > 1 + 1e-4):
        raise ModelOutputError(f"{where}: probabilities must lie in [0, 1], got [{p.min()}, {p.max()}]")
    if rows_sum_to_one and p.size and not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ModelOutputError(f"{where}: probability rows must sum to 1, got {p.sum(axis=1)[:4]}")
    return np.clip(p, 0.0, 1.0).astype(np.float32)
