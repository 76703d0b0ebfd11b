"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) read without dlib.

:func:`parse` reads dlib's serialised ``net`` with numpy only, following dlib 19/20's own code
(``dlib/serialize.h``, ``dlib/cuda/tensor.h``, ``dlib/dnn/{core,layers,input,loss}.h``):

* integers: a control byte (bit 7 = negative, low 4 bits = byte count) then the magnitude,
  little endian; ``0`` is ``01 00``. Unsigned types reject the sign bit.
* floats: two such integers, the int64 mantissa FIRST and then the int16 exponent (the comment in
  serialize.h says the opposite; the code writes mantissa first); value = mantissa * 2**exponent;
  exponents 32000/32001/32002 are +inf/-inf/nan. Bools are the bytes ``'1'``/``'0'``.
* strings: an unsigned length then the bytes. Tensors: version 2, four int64 dims, raw
  little-endian float32 (not dlib's float encoding). ``alias_tensor``: version 1 and four dims.
* a network is written top (loss) first, but ``add_layer`` writes its *subnetwork before its own
  layer*, so the file holds the loss, then one version integer per wrapper down to the input
  (``2`` add_layer, ``1`` tag/skip, ``3`` the add_layer over the input), then the input layer,
  then each layer's details and cached state from the bottom up.
* tag and skip wrappers are written as a bare version integer: their ids (tag1, skip1) and the
  tag an ``add_prev`` reads are NOT in the file. The wiring therefore comes from the network type
  (``anet_type`` of dlib's ``dnn_face_recognition_ex.cpp``, :data:`ANET`), and parse checks that
  the file's sequence of layer names and tag/skip positions is exactly that type's.

:func:`to_onnx` builds an onnxruntime-friendly graph (each affine folded into the conv before it,
Pad+Add where ``add_prev`` meets tensors of different sizes, as dlib zero-fills to the larger);
:func:`convert` turns the ``.dat`` bytes into deterministic ``.onnx`` bytes.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ANET", "DlibFormatError", "DlibNet", "Layer", "MARKS", "Reader", "Tok", "convert",
           "convert_file", "parse", "to_onnx"]

INPUT_NAME, OUTPUT_NAME = "chips", "descriptor"
OPSET = 17
_SPECIAL_EXP = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class DlibFormatError(ValueError):
    """The bytes are not the dlib network this module knows; the message says where and what."""


class Reader:
    """dlib's primitive decoders over a byte buffer; ``pos`` is the next byte to read."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = memoryview(data), pos

    def _take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"byte {self.pos}: {what} needs {n} bytes, only "
                                  f"{len(self.data) - self.pos} left (truncated file?)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, *, unsigned: bool = False, max_bytes: int = 8) -> int:
        at = self.pos
        ctrl = self._take(1, "an integer")[0]
        size = ctrl & (0x8F if unsigned else 0x0F)
        if size == 0 or size > max_bytes:
            raise DlibFormatError(f"byte {at}: integer control byte must give 1..{max_bytes} bytes"
                                  f"{' and no sign' if unsigned else ''}, got 0x{ctrl:02x}")
        value = int.from_bytes(self._take(size, "an integer"), "little")
        return -value if ctrl & 0x80 and not unsigned else value

    def uint(self) -> int:
        return self.int(unsigned=True)

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int(max_bytes=2)
        if exponent in _SPECIAL_EXP:
            return _SPECIAL_EXP[exponent]
        return math.ldexp(float(mantissa), exponent)

    def bool(self) -> bool:
        at, ch = self.pos, bytes(self._take(1, "a bool"))
        if ch not in (b"0", b"1"):
            raise DlibFormatError(f"byte {at}: a bool must be '0' or '1', got {ch!r}")
        return ch == b"1"

    def string(self) -> str:
        n = self.uint()
        return bytes(self._take(n, "a string")).decode("latin-1")

    def dims(self, version: int, what: str) -> tuple[int, int, int, int]:
        at, got = self.pos, self.int()
        if got != version:
            raise DlibFormatError(f"byte {at}: {what} version must be {version}, got {got}")
        n, k, nr, nc = (self.int() for _ in range(4))
        if min(n, k, nr, nc) < 0:
            raise DlibFormatError(f"byte {at}: {what} dims must be >= 0, got {(n, k, nr, nc)}")
        return n, k, nr, nc

    def tensor(self) -> np.ndarray:
        shape = self.dims(2, "tensor")
        count = math.prod(shape)
        raw = self._take(4 * count, f"a tensor of {shape}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        return self.dims(1, "alias_tensor")


@dataclass(frozen=True, eq=False)
class Layer:
    """One step of the forward pass, in dlib's terms.

    ``kind``: input | con | affine | relu | max_pool | avg_pool | add_prev | tag | skip | fc.
    con: ``weight`` [out, in, kh, kw], ``bias`` [out] (zeros when dlib has none), ``relu`` when the
    con_ fuses one. affine: ``gamma``/``bias`` per channel (a bn_ is converted as dlib's affine_
    does). fc: ``weight`` [in, out] (dlib's layout: output = input @ weight), ``bias`` or None.
    Pools: ``size`` (0 = the whole input), ``stride``, ``padding`` as (y, x), taken from the file
    (dlib's default padding is k/2 for stride 1, else 0). tag/skip/add_prev: ``tag`` id.
    ``shape``: this layer's output (k, nr, nc) for the input size in the file.
    """

    kind: str
    name: str
    shape: tuple[int, int, int]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    gamma: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    tag: int = 0
    relu: bool = False
    means: tuple[float, float, float] | None = None


@dataclass(frozen=True, eq=False)
class DlibNet:
    """``layers`` in forward order (input first); ``marks``: stable name -> index of the layer
    whose output carries it; ``loss``: the loss layer's name and settings."""

    layers: tuple[Layer, ...]
    marks: dict[str, int]
    loss: dict[str, Any]

    def output_shape(self, mark: str) -> tuple[int, ...]:
        """Shape of a marked tensor per sample (``pooled`` is flattened)."""
        shape = self.layers[self.marks[mark]].shape
        return (shape[0],) if mark == "pooled" else shape


class Tok(NamedTuple):
    """One entry of a network type, bottom-up: a layer kind (as :class:`Layer`), ``tag``/``skip``
    (``arg`` = id), ``add_prev`` (``arg`` = the tag it reads), or ``mark`` (names the tensor below)."""

    kind: str
    name: str
    arg: int = 0


def _block(p: str, down: bool) -> list[Tok]:
    """``ares``/``ares_down`` of anet_type, bottom-up: tag1, con, affine, relu, con, affine,
    [tag2, skip1, avg_pool 2x2/2], add_prev, relu."""
    toks = [Tok("tag", f"{p}.tag1", 1), Tok("con", f"{p}.conv1"), Tok("affine", f"{p}.affine1"),
            Tok("relu", f"{p}.relu1"), Tok("con", f"{p}.conv2"), Tok("affine", f"{p}.affine2")]
    if down:
        toks += [Tok("tag", f"{p}.tag2", 2), Tok("skip", f"{p}.skip1", 1),
                 Tok("avg_pool", f"{p}.shortcut_pool")]
    return toks + [Tok("add_prev", f"{p}.add", 2 if down else 1), Tok("relu", f"{p}.relu")]


def _anet() -> tuple[Tok, ...]:
    toks = [Tok("input", "input"), Tok("con", "stem.conv"), Tok("affine", "stem.affine"),
            Tok("relu", "stem.relu"), Tok("max_pool", "stem.max_pool"), Tok("mark", "stem")]
    for level, downs in ((4, [False] * 3), (3, [True] + [False] * 3), (2, [True, False, False]),
                         (1, [True, False, False]), (0, [True])):
        for i, down in enumerate(downs):
            toks += _block(f"level{level}.{i}", down)
        toks.append(Tok("mark", f"level{level}"))
    return tuple(toks + [Tok("avg_pool", "pool"), Tok("mark", "pooled"), Tok("fc", "fc")])


#: dlib's ``anet_type`` bottom-up; ``mark`` entries name tensors and are not in the file.
ANET = _anet()
MARKS = tuple(t.name for t in ANET if t.kind == "mark")
_KINDS = {"con_4": "con", "con_5": "con", "con_6": "con", "bn_con2": "affine", "affine_": "affine",
          "affine_2": "affine", "relu_": "relu", "relu_2": "relu", "max_pool_2": "max_pool",
          "avg_pool_2": "avg_pool", "add_prev_": "add_prev", "fc_2": "fc", "fc_3": "fc"}


def _details(r: Reader) -> dict[str, Any]:
    """One layer's own fields (after its name string), decoded as dlib's deserialize does."""
    at, ver = r.pos, r.string()
    kind = _KINDS.get(ver)
    if kind is None:
        raise DlibFormatError(f"byte {at}: layer {ver!r} is not supported here "
                              f"(known: {', '.join(sorted(_KINDS))})")
    d: dict[str, Any] = {"kind": kind, "version": ver, "at": at}
    if kind == "con":
        params, nf = r.tensor().ravel(), r.int()
        d["size"] = (r.int(), r.int())
        d["stride"], d["padding"] = (r.int(), r.int()), (r.int(), r.int())
        fshape, _bshape = r.alias(), r.alias()
        _mults = [r.float() for _ in range(4)]
        use_bias = r.bool() if ver != "con_4" else True
        d["relu"] = r.bool() if ver == "con_6" else False
        nw = math.prod(fshape)
        if fshape[0] != nf or params.size != nw + (nf if use_bias else 0):
            raise DlibFormatError(f"byte {at}: con_ has {params.size} parameters, filters {fshape}")
        d["weight"] = params[:nw].reshape(fshape)
        d["bias"] = params[nw:].copy() if use_bias else np.zeros(nf, np.float32)
    elif ver == "bn_con2":
        params, (_, k, _, _), _beta = r.tensor().ravel(), r.alias(), r.alias()
        _means, _invstds, rmean, rvar = (r.tensor().ravel() for _ in range(4))
        _updates, _window = r.uint(), r.uint()
        _mults = [r.float() for _ in range(4)]
        eps = np.float32(r.float())
        gamma = params[:k] / np.sqrt(rvar + eps)  # dlib's affine_(const bn_&), in float32
        d["gamma"], d["bias"] = gamma, params[k:2 * k] - gamma * rmean
    elif kind == "affine":
        params, (_, k, nr, nc), _beta, mode = r.tensor().ravel(), r.alias(), r.alias(), r.int()
        disabled = r.bool() if ver == "affine_2" else False
        if mode != 0 and nr * nc != 1:
            raise DlibFormatError(f"byte {at}: affine_ in FC mode over {k}x{nr}x{nc} is not supported")
        k = k * nr * nc
        d["gamma"], d["bias"] = ((np.ones(0, np.float32), np.zeros(0, np.float32)) if disabled
                                 else (params[:k].copy(), params[k:2 * k].copy()))
    elif kind == "relu":
        d["disabled"] = r.bool() if ver == "relu_2" else False
    elif kind in ("max_pool", "avg_pool"):
        d["size"] = (r.int(), r.int())
        d["stride"], d["padding"] = (r.int(), r.int()), (r.int(), r.int())
    elif kind == "fc":
        n_out, n_in, params = r.uint(), r.uint(), r.tensor().ravel()
        _wshape, _bshape, bias_mode = r.alias(), r.alias(), r.int()
        _mults = [r.float() for _ in range(4)]
        use_bias = (r.bool() if ver == "fc_3" else True) and bias_mode == 0
        if params.size != n_in * n_out + (n_out if use_bias else 0):
            raise DlibFormatError(f"byte {at}: fc_ has {params.size} parameters for {n_in}->{n_out}")
        d["weight"] = params[:n_in * n_out].reshape(n_in, n_out)
        d["bias"] = params[n_in * n_out:].copy() if use_bias else None
    return d


def _state(r: Reader, *, add_layer_version: int, input_level: bool) -> None:
    """Skip what add_layer writes after its details (flags, cached tensors; all unused here)."""
    for _ in range(3):
        r.bool()
    for _ in range(2 if add_layer_version == 1 else 3):
        r.tensor()
    if input_level and add_layer_version >= 3:
        r.uint()


def _generic(r: Reader) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Loss settings and the file's entries bottom-up: input, layers, and ``marker`` (tag/skip)."""
    if (v := r.int()) != 1:
        raise DlibFormatError(f"byte 0: add_loss_layer version must be 1, got {v}; not a dlib net")
    name = r.string()
    if name == "loss_metric_2":
        loss = {"name": name, "margin": r.float(), "distance_threshold": r.float()}
    elif name == "loss_metric_":
        loss = {"name": name, "margin": 0.1, "distance_threshold": 0.75}
    else:
        raise DlibFormatError(f"loss {name!r} is not supported (this module reads loss_metric nets)")
    versions: list[int] = []
    while True:
        at, v = r.pos, r.int()
        if v > 3:  # the input layer's name string starts here
            r.pos = at
            break
        versions.append(v)
    at, iname = r.pos, r.string()
    if iname not in ("input_rgb_image_sized", "input_rgb_image") or not versions:
        raise DlibFormatError(f"byte {at}: expected an input_rgb_image layer below {len(versions)} "
                              f"wrappers, got {iname!r}")
    entry: dict[str, Any] = {"kind": "input", "means": (r.float(), r.float(), r.float())}
    entry["size"] = (r.uint(), r.uint()) if iname.endswith("_sized") else (150, 150)
    entries = [entry]
    for depth, v in enumerate(reversed(versions)):
        bottom = depth == 0
        peek = Reader(r.data, r.pos)
        is_layer = v >= 2 and not (bottom and peek.int() == 2)  # tag over input: v2 + tensor
        if v == 1 or not is_layer:
            entries.append({"kind": "marker"})
            if bottom:  # add_tag_layer<ID, input>: cached_output, grad_final, a flag, [factor]
                r.tensor(), r.tensor(), r.bool()
                if v >= 2:
                    r.uint()
            continue
        entries.append(_details(r))
        _state(r, add_layer_version=v, input_level=bottom)
    if r.pos != len(r.data):
        raise DlibFormatError(f"{len(r.data) - r.pos} bytes left after the network at byte {r.pos}")
    return loss, entries


def _out_shape(tok: Tok, d: dict[str, Any], cur: tuple[int, int, int],
               tags: dict[int, tuple[int, int, int]]) -> tuple[int, int, int]:
    k, nr, nc = cur
    if tok.kind == "con" or tok.kind.endswith("pool"):
        (fy, fx), (sy, sx), (py, px) = d["size"], d["stride"], d["padding"]
        fy, fx = fy or nr, fx or nc
        k = d["weight"].shape[0] if tok.kind == "con" else k
        return k, 1 + (nr + 2 * py - fy) // sy, 1 + (nc + 2 * px - fx) // sx
    if tok.kind == "add_prev":
        return tuple(max(a, b) for a, b in zip(cur, tags[tok.arg]))  # type: ignore[return-value]
    if tok.kind == "fc":
        return d["weight"].shape[1], 1, 1
    return cur


def parse(data: bytes, arch: tuple[Tok, ...] = ANET) -> DlibNet:
    """Read a serialised dlib net of type ``arch`` (default: the face ResNet's) into a
    :class:`DlibNet`; raises :class:`DlibFormatError` when the bytes are not that type."""
    loss, entries = _generic(Reader(data))
    spec = [t for t in arch if t.kind != "mark"]
    got = ["tag/skip" if e["kind"] == "marker" else e["kind"] for e in entries]
    want = ["tag/skip" if t.kind in ("tag", "skip") else t.kind for t in spec]
    if got != want:
        bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise DlibFormatError(
            f"the file's layers differ from anet_type at position {bad} ({spec[bad].name if bad < len(spec) else 'end'}): "
            f"file has {got[bad:bad + 3]}, expected {want[bad:bad + 3]} ({len(got)} vs {len(want)} entries)")
    layers: list[Layer] = []
    marks: dict[str, int] = {}
    cur: tuple[int, int, int] = (3, *entries[0]["size"])
    tags: dict[int, tuple[int, int, int]] = {}
    it = iter(zip(spec, entries))
    for tok in arch:
        if tok.kind == "mark":
            marks[tok.name] = len(layers) - 1
            continue
        _, d = next(it)
        if tok.kind == "tag":
            tags[tok.arg] = cur
        elif tok.kind == "skip":
            cur = tags[tok.arg]
        else:
            want_in = {"con": lambda: d["weight"].shape[1], "affine": lambda: d["gamma"].size or cur[0],
                       "fc": lambda: d["weight"].shape[0]}.get(tok.kind, lambda: None)()
            if want_in is not None and want_in != (cur[0] if tok.kind != "fc" else math.prod(cur)):
                raise DlibFormatError(f"{tok.name}: expects {want_in} inputs, gets a {cur} tensor")
            cur = _out_shape(tok, d, cur, tags)
        if min(cur) <= 0:
            raise DlibFormatError(f"{tok.name}: output shape {cur} is empty for this input size")
        fields = {k: v for k, v in d.items() if k in ("weight", "bias", "gamma", "size", "stride",
                                                      "padding", "relu", "means")}
        if d.get("disabled") or (tok.kind == "affine" and d["gamma"].size == 0):
            fields, kind = {}, "identity"
        else:
            kind = tok.kind
        layers.append(Layer(kind, tok.name, cur, tag=tok.arg, **fields))
    logger.debug("parsed dlib net: %d layers, loss %s", len(layers), loss["name"])
    return DlibNet(tuple(layers), marks, loss)


def to_onnx(net: DlibNet, *, extra_outputs: tuple[str, ...] = ()) -> Any:
    """An ``onnx.ModelProto``: ``chips`` [N, 3, H, W] (normalised outside) -> ``descriptor``
    [N, 128] (dlib's output, not re-normalised), plus the marked tensors in ``extra_outputs``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    unknown = [m for m in extra_outputs if m not in net.marks]
    if unknown:
        raise ValueError(f"extra_outputs {unknown} are not known; choose from {list(net.marks)}")
    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    names: dict[int, str] = {i: m for m, i in net.marks.items()}
    tags: dict[int, tuple[str, tuple[int, int, int]]] = {}
    cur, shape, folded, flat = INPUT_NAME, net.layers[0].shape, False, False
    for i, layer in enumerate(net.layers[1:], start=1):
        mark = names.get(i)
        out = mark if mark and mark != "pooled" else layer.name
        nxt = net.layers[i + 1] if i + 1 < len(net.layers) else None
        if folded:  # this affine was folded into the conv before it
            folded, shape = False, layer.shape
            continue
        if layer.kind == "con":
            w, b = np.asarray(layer.weight), np.asarray(layer.bias)
            if nxt is not None and nxt.kind == "affine" and not layer.relu and mark is None:
                g, beta = np.asarray(nxt.gamma), np.asarray(nxt.bias)
                w, b = w * g[:, None, None, None], b * g + beta
                folded, out = True, names.get(i + 1, nxt.name)
            py, px = layer.padding
            cur = node("Conv", [cur, const(f"{layer.name}.weight", w), const(f"{layer.name}.bias", b)],
                       out, kernel_shape=list(w.shape[2:]), strides=list(layer.stride),
                       pads=[py, px, py, px])
            if layer.relu:
                nodes[-1].output[0] = f"{out}.pre_relu"
                cur = node("Relu", [f"{out}.pre_relu"], out)
        elif layer.kind == "affine":
            k = layer.shape[0]
            gamma, beta = np.asarray(layer.gamma).reshape(1, k, 1, 1), np.asarray(layer.bias).reshape(1, k, 1, 1)
            cur = node("Mul", [cur, const(f"{layer.name}.gamma", gamma)], f"{layer.name}.scaled")
            cur = node("Add", [cur, const(f"{layer.name}.beta", beta)], out)
        elif layer.kind == "relu":
            cur = node("Relu", [cur], out)
        elif layer.kind in ("max_pool", "avg_pool"):
            (fy, fx), (py, px) = layer.size, layer.padding
            if layer.kind == "avg_pool" and fy == fx == 0 and layer.stride == (1, 1):
                cur = node("GlobalAveragePool", [cur], out)
            else:  # dlib's windows are clipped to the image: pads count as absent (ONNX default)
                op = "MaxPool" if layer.kind == "max_pool" else "AveragePool"
                cur = node(op, [cur], out, kernel_shape=[fy or shape[1], fx or shape[2]],
                           strides=list(layer.stride), pads=[py, px, py, px])
        elif layer.kind == "tag":
            tags[layer.tag] = (cur, shape)
        elif layer.kind == "skip":
            cur = tags[layer.tag][0]
        elif layer.kind == "add_prev":
            parts = []
            for j, (src, s) in enumerate(((cur, shape), tags[layer.tag])):
                pad = [t - a for t, a in zip(layer.shape, s)]
                if any(pad):  # dlib zero-fills the smaller tensor at the end of k, rows and cols
                    pads = const(f"{layer.name}.pads{j}", np.array([0, 0, 0, 0, 0, *pad], np.int64))
                    src = node("Pad", [src, pads], f"{layer.name}.padded{j}", mode="constant")
                parts.append(src)
            cur = node("Add", parts, out)
        elif layer.kind == "fc":
            if not flat:
                cur = node("Flatten", [cur], f"{layer.name}.flat", axis=1)
            has_bias = layer.bias is not None
            cur = node("MatMul", [cur, const(f"{layer.name}.weight", np.asarray(layer.weight))],
                       f"{layer.name}.matmul" if has_bias else OUTPUT_NAME)
            if has_bias:
                cur = node("Add", [cur, const(f"{layer.name}.bias", np.asarray(layer.bias))], OUTPUT_NAME)
        elif layer.kind != "identity":
            raise ValueError(f"{layer.name}: layer kind {layer.kind!r} has no ONNX lowering")
        if mark and cur != mark:
            flat = mark == "pooled"
            cur = node("Flatten", [cur], mark, axis=1) if flat else node("Identity", [cur], mark)
        shape = layer.shape

    def value(name: str, dims: tuple[int, ...]) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *dims])

    _, h, w = net.layers[0].shape
    graph = helper.make_graph(
        nodes, "dlib_face_recognition_resnet_model_v1", [value(INPUT_NAME, (3, h, w))],
        [value(OUTPUT_NAME, (net.layers[-1].shape[0],)),
         *(value(m, net.output_shape(m)) for m in extra_outputs)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8,
                              producer_name="forensic-gender daemon.dlibnet", producer_version="1")
    model.doc_string = ("dlib face recognition ResNet v1 (Davis King, dlib-models, CC0). Input: RGB "
                        "chips, (pixel - mean[c]) / 256 with means R,G,B = %s; output: dlib's "
                        "128-d descriptor." % ", ".join(f"{m:g}" for m in net.layers[0].means or ()))
    onnx.checker.check_model(model)
    return model


def convert(data: bytes, extra_outputs: tuple[str, ...] = ()) -> bytes:
    """The ``.dat`` bytes -> the derived ONNX bytes (same input, same output bytes); the marked
    tensors in ``extra_outputs`` are outputs too (a head on the backbone reads one)."""
    model = to_onnx(parse(data), extra_outputs=extra_outputs)
    model.metadata_props.add(key="forensic_gender.transform", value="dlib-to-onnx")
    model.metadata_props.add(key="forensic_gender.source_sha256", value=hashlib.sha256(data).hexdigest())
    return model.SerializeToString(deterministic=True)


def convert_file(src: Path, dest: Path) -> str:
    """Convert ``src`` (.dat) into ``dest`` (.onnx); returns the sha256 of what was written."""
    out = convert(Path(src).read_bytes())
    Path(dest).write_bytes(out)
    return hashlib.sha256(out).hexdigest()
