"""The dlib 64x64 ResNet of ``age-v1.onnx`` as a PyTorch module, with a new gender head.

``age-v1`` (Cydral / dlib-models, CC0) is a small ResNet trained on aligned 64x64 face chips:
7x7/2 conv, 3x3/2 max-pool, one residual block at 64 channels, then two stages of
(down-sampling block + residual block) at 128 and 256 channels, global average pooling and a
fully connected layer. dlib's "affine" layers (batch norm frozen into a per-channel scale and
offset) follow every convolution; a down-sampling block adds its 2x2-average-pooled input,
zero-padded to the new channel count (and the residual branch zero-padded at the bottom/right
when its spatial size is one short), exactly as the ONNX graph does.

:func:`from_onnx` reads the initializers straight from the ONNX file with the ``onnx`` package
(no converter needed) and :func:`check_against_onnx` proves that the module reproduces the
graph's output. :func:`export_onnx` folds each affine into its convolution, divides the logits by
the calibration temperature and appends the softmax, so the shipped graph has the same contract
as ``gender-v1`` (``images`` -> ``probabilities`` [female, male]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Affine(nn.Module):
    """dlib's affine layer: ``x * scale + offset`` per channel (learnable)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset


class ConvAffine(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int, pad: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, pad), Affine(cout))


class Block(nn.Module):
    """Residual block. ``down``: stride-2 first conv (no padding); the shortcut is a 2x2 average
    pool zero-padded to ``cout`` channels, and the branch is zero-padded to the shortcut's size."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.c1 = ConvAffine(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.c2 = ConvAffine(cout, cout, 3, 1, 1)
        self.extra = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(F.relu(self.c1(x)))
        if not self.down:
            return F.relu(y + x)
        s = F.avg_pool2d(x, 2, 2)
        s = F.pad(s, (0, 0, 0, 0, 0, self.extra))
        dh, dw = s.shape[2] - y.shape[2], s.shape[3] - y.shape[3]
        if dh or dw:
            y = F.pad(y, (0, dw, 0, dh))
        return F.relu(s + y)


class DlibResNet64(nn.Module):
    """age-v1's trunk (64x64 RGB chips, (byte - mean) / 256) with an ``outputs``-way head."""

    def __init__(self, outputs: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = ConvAffine(3, 64, 7, 2, 0)
        self.b1 = Block(64, 64, False)
        self.d2 = Block(64, 128, True)
        self.b2 = Block(128, 128, False)
        self.d3 = Block(128, 256, True)
        self.b3 = Block(256, 256, False)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(256, outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.b3(self.d3(self.b2(self.d2(self.b1(x)))))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x)))


# ONNX initializer prefix -> module path, in graph order (weights/bias of the conv, scale/offset
# of the affine that follows it).
_LAYERS = {
    ("layer_52", "layer_51"): "stem",
    ("layer_47", "layer_46"): "b1.c1",
    ("layer_44", "layer_43"): "b1.c2",
    ("layer_39", "layer_38"): "d2.c1",
    ("layer_36", "layer_35"): "d2.c2",
    ("layer_28", "layer_27"): "b2.c1",
    ("layer_25", "layer_24"): "b2.c2",
    ("layer_20", "layer_19"): "d3.c1",
    ("layer_17", "layer_16"): "d3.c2",
    ("layer_9", "layer_8"): "b3.c1",
    ("layer_6", "layer_5"): "b3.c2",
}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def from_onnx(path: Path, outputs: int = 2, dropout: float = 0.0, keep_head: bool = False) -> DlibResNet64:
    """The trunk loaded from ``age-v1.onnx``; the head is new unless ``keep_head`` (81 ages)."""
    w = _initializers(path)
    net = DlibResNet64(81 if keep_head else outputs, dropout)
    state = {}
    for (conv, aff), mod in _LAYERS.items():
        state[f"{mod}.0.weight"] = w[f"{conv}_weights"]
        state[f"{mod}.0.bias"] = w[f"{conv}_bias"]
        state[f"{mod}.1.scale"] = w[f"{aff}_scale"]
        state[f"{mod}.1.offset"] = w[f"{aff}_offset"]
    if keep_head:
        state["fc.weight"] = w["layer_1_weights"].T
        state["fc.bias"] = w["layer_1_bias"]
    state = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in state.items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"fc.weight", "fc.bias"}, missing
    return net


def check_against_onnx(path: Path, n: int = 4, seed: int = 0) -> float:
    """Max |difference| between the module (with age-v1's own head) and the ONNX graph."""
    import onnxruntime as ort

    net = from_onnx(path, keep_head=True).eval()
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (n, 3, 64, 64)).astype(np.float32)
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": x})
    with torch.no_grad():
        got = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    return float(np.abs(got - ref).max())


class _Export(nn.Module):
    """Inference graph: folded convs, logits / T, softmax."""

    def __init__(self, net: DlibResNet64, temperature: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(images) * self.inv_t, dim=1)


def folded(net: DlibResNet64) -> DlibResNet64:
    """A copy whose affines are folded into the convolutions (scale 1, offset 0 left behind are
    removed by replacing the Affine with Identity)."""
    import copy

    out = copy.deepcopy(net).eval()
    for mod in out.modules():
        if isinstance(mod, ConvAffine):
            conv, aff = mod[0], mod[1]
            s = aff.scale.detach().reshape(-1)
            with torch.no_grad():
                conv.weight.mul_(s.reshape(-1, 1, 1, 1))
                conv.bias.copy_(conv.bias * s + aff.offset.detach().reshape(-1))
            mod[1] = nn.Identity()
    return out


def export_onnx(net: DlibResNet64, path: Path, temperature: float = 1.0, fp16_weights: bool = True,
                opset: int = 17) -> None:
    """Write the inference graph: input ``images`` [N,3,64,64], output ``probabilities`` [N,2]
    (softmax of logits / ``temperature``, columns [female, male]), dynamic batch. With
    ``fp16_weights`` the weight tensors are stored as float16 and cast to float32 in the graph
    (onnxruntime folds the casts when the session loads: half the file, same fp32 arithmetic)."""
    import io

    import onnx

    model = _Export(folded(net), temperature).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model, (torch.zeros(1, 3, 64, 64),), buf, input_names=["images"], output_names=["probabilities"],
        dynamic_axes={"images": {0: "N"}, "probabilities": {0: "N"}}, opset_version=opset, dynamo=False,
    )
    m = onnx.load_from_string(buf.getvalue())
    if fp16_weights:
        m = _fp16_initializers(m)
    m.producer_name = "forensic-gender training"
    m.doc_string = "gender-wild-v1: dlib 64x64 ResNet (age-v1 trunk) fine-tuned for gender on faces in the wild"
    onnx.checker.check_model(m)
    Path(path).write_bytes(m.SerializeToString())


def _fp16_initializers(m):
    """Store large float32 initializers as float16 followed by a Cast to float32."""
    import onnx
    from onnx import helper, numpy_helper

    g = m.graph
    new_inits, casts = [], []
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size >= 1024:
            h = numpy_helper.from_array(arr.astype(np.float16), init.name + "_fp16")
            new_inits.append(h)
            casts.append(helper.make_node("Cast", [h.name], [init.name], to=onnx.TensorProto.FLOAT,
                                          name=init.name + "_cast"))
        else:
            new_inits.append(init)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    return m
