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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"


class ModelLoadError(Exception):
    """A model file could not be loaded or does not have the expected signature."""


class ModelOutputError(Exception):
    """A model produced output that is not what its contract says (shape, range, NaN)."""


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
    ) -> None:
        """Load ``path``; ``inputs`` maps each expected input name to its rank, ``outputs``
        lists the output names that must exist (None: all of the graph's outputs)."""
        self.name = name or Path(path).name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Memory (measured by benchmarks/bench.py --memcheck and the arena experiments in
        # benchmarks/README.md): the detector's inputs change shape with every image, and a
        # memory *pattern* (one pre-planned block per input shape) is what made a worker grow
        # with the arena on. Without patterns the arena only holds the largest activation set
        # the detector's input cap allows (max_side), and it is reused: no page faults per
        # run. With the arena off every large activation is mmap-ed and faulted in again on
        # every run, which cost ~35% of the detector's time in system CPU on this machine.
        opts.enable_cpu_mem_arena = True
        opts.enable_mem_pattern = False
        try:
            model = flush_denormals(path)
            self._session = ort.InferenceSession(model if model is not None else str(path), sess_options=opts, providers=[PROVIDER])
        except Exception as err:  # onnxruntime raises several unrelated types
            raise ModelLoadError(
                f"{self.name}: could not load {path} as an ONNX model ({err}); "
                "check it with `forensic-gender models verify`"
            ) from err
        got = self._session.get_providers()
        if not got or got[0] != PROVIDER:
            raise ModelLoadError(f"{self.name}: asked for {PROVIDER}, onnxruntime gave {got}")
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
        self.input_shapes = {i.name: list(i.shape) for i in self._session.get_inputs()}
        self.output_names = list(outputs) if outputs is not None else have_out

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; returns the expected outputs in the order given at load time."""
        return self._session.run(self.output_names, feeds)


def flush_denormals(path: str | Path) -> bytes | None:
    """The model at ``path`` serialized with its subnormal float32 weights set to zero, or None
    when it has none (or cannot be parsed: then onnxruntime reports the problem itself)."""
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
