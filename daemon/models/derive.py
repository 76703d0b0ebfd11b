"""Derivations: deterministic transforms from a release member to the file inference loads
(dynamic-shapes CenterFace; dlib's face ResNet to ONNX through :mod:`daemon.dlibnet`).

``onnx`` is imported only here (and in :mod:`daemon.dlibnet`), lazily."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from daemon.models.manifest import ModelError, ModelSpec


def make_dynamic(model_bytes: bytes, dims: Mapping[str, Sequence[int | str]]) -> bytes:
    """Rewrite the named inputs/outputs to ``dims`` (int = fixed, str = symbol), drop initializers
    from the graph inputs, unused initializers and intermediate shape hints, and serialize
    deterministically.

    Same input bytes and dims give the same output bytes; fixed dims that disagree with the graph
    are errors.
    """
    import onnx  # heavy; only needed when deriving
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(model_bytes)
    except DecodeError as err:
        raise ModelError(f"not an ONNX model ({err}); fetch it again") from err
    if model.ir_version < 4:
        raise ModelError(f"ONNX IR version must be >= 4 to keep weights out of the graph inputs, "
                         f"got {model.ir_version}")
    graph = model.graph
    used = _consumed_names(graph) | {v.name for v in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]  # e.g. BN num_batches_tracked
    for tensor in unused:
        graph.initializer.remove(tensor)
    initializers = {t.name for t in graph.initializer} | {t.name for t in unused}
    kept = [v for v in graph.input if v.name not in initializers]
    del graph.input[:]
    graph.input.extend(kept)
    del graph.value_info[:]  # fixed intermediate shapes would contradict the symbolic ones
    values = {v.name: v for v in (*graph.input, *graph.output)}
    problems = []
    for name, shape in dims.items():
        if name not in values:
            problems.append(f"{name!r} is not a graph input or output (those are {sorted(values)})")
            continue
        tdims = values[name].type.tensor_type.shape.dim
        if len(tdims) != len(shape):
            problems.append(f"{name!r} has rank {len(tdims)}, the manifest says {list(shape)}")
            continue
        for i, (dim, want) in enumerate(zip(tdims, shape, strict=True)):
            if isinstance(want, int) and dim.HasField("dim_value") and dim.dim_value != want:
                problems.append(f"{name!r} dim {i} is {dim.dim_value} in the graph, the manifest says {want}")
            dim.Clear()
            if isinstance(want, int):
                dim.dim_value = want
            else:
                dim.dim_param = want
    if problems:
        raise ModelError("cannot make the graph dynamic: " + "; ".join(problems))
    source_sha = hashlib.sha256(model_bytes).hexdigest()
    model.metadata_props.add(key="forensic_gender.transform", value="dynamic-shapes")
    model.metadata_props.add(key="forensic_gender.source_sha256", value=source_sha)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"the derived graph does not validate: {err}") from err
    derived: bytes = model.SerializeToString(deterministic=True)
    return derived


def _consumed_names(graph: Any) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop bodies) included."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                names |= _consumed_names(sub)
    return names


def _derive(spec: ModelSpec, data: bytes) -> bytes:
    if spec.derived_transform == "dynamic-shapes":
        dims = {spec.input.name: spec.input.shape} | {o.name: o.shape for o in spec.outputs}
        return make_dynamic(data, dims)
    if spec.derived_transform == "dlib-to-onnx":
        from daemon import dlibnet

        names = (spec.input.name, tuple(o.name for o in spec.outputs))
        extra = names[1][1:]
        if names[0] != dlibnet.INPUT_NAME or names[1][:1] != (dlibnet.OUTPUT_NAME,) or not set(extra) <= set(dlibnet.MARKS):
            raise ModelError(f"models.{spec.name}: the dlib-to-onnx graph has input "
                             f"{dlibnet.INPUT_NAME!r} and outputs {dlibnet.OUTPUT_NAME!r} then any of "
                             f"{list(dlibnet.MARKS)}, the manifest says {names[0]!r} and {list(names[1])}; "
                             f"fix the manifest")
        try:
            return dlibnet.convert(data, extra_outputs=extra)
        except dlibnet.DlibFormatError as err:
            raise ModelError(f"model {spec.name}: {spec.filename} is not the dlib network expected "
                             f"({err}); fetch it again") from err
    raise ModelError(f"models.{spec.name}.derived.transform {spec.derived_transform!r} is unknown")
