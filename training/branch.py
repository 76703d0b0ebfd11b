"""Gender on dlib's face backbone: candidate heads, grouped cross-validation, the shipped branch.

Reads the frozen-trunk features of :mod:`training.features` (every train face, several views)
and compares, by 5-fold cross-validation grouped by WIDER scene / LFW person / UTKFace file /
FairFace image (a group never straddles fit and test), on view 0 (the inference chip):

* ``gender-v1``: the fetched model on its own 32 px chip (not trained here: a fair baseline);
* ``desc-logistic``: a logistic head on dlib's 128-d descriptor (the identity vector alone);
* ``branch-l0``: a copy of dlib's top block (``level0``, initialised from dlib's weights) on the
  ``level1`` tensor, then pooling and a linear layer, fine-tuned;
* ``branch-l1``: a copy of dlib's ``level1`` blocks and ``level0`` on the ``level2`` tensor;
* ``ctx060-l0`` / ``ctx100-l0``: two copies of ``level0``, one on the face chip's ``level1`` and
  one on a wider-context chip's (padding 0.6 / 1.0: hair, ears, neck; needs
  ``training.features --contexts 0.6 1.0``); cross-validation only (they did not win);
* ``+v1``: a candidate's logit averaged with gender-v1's.

Training samples a random view per face (views 1.. are mirrored / degraded chips), balances
sources equally and classes within each source. Reported per source: F1 (male positive) with a
95% grouped bootstrap interval, accuracy, ROC-AUC; out-of-fold temperature and uncertain band.
``--final NAME`` fits that candidate on all train faces and writes the branch as ONNX
(``level1`` or ``level2`` in, ``probabilities`` [female, male] out, temperature folded in,
float16 weights with Cast nodes)::

    python -m training.branch --cv                     # the table (var/train-runs/branch-cv-*.json)
    python -m training.branch --final branch-l0        # models/gender-dlib-v1.onnx
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from daemon import dlibnet, metrics, models
from training import extract, features
from training.model import Block

log = logging.getLogger("training.branch")
ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "var" / "train-runs"
SOURCES = features.SOURCES
FOLDS = 5
BAND_MARGINS = (0.1, 0.15, 0.2, 0.25, 0.3)  # uncertain bands reported out of fold (the default is chosen from them)


# ------------------------------------------------------------------------------------- data


def load(cache: Path) -> dict[str, np.ndarray]:
    """All sources' features concatenated (the newest cache file per source)."""
    parts = []
    for src in SOURCES:
        found = sorted(cache.glob(f"feats-{src}-*.npz"), key=lambda p: p.stat().st_mtime)
        found = [p for p in found if not p.name.endswith(".tmp.npz")]
        if not found:
            raise SystemExit(f"no features for {src} in {cache}: run `python -m training.features --sources {src}`")
        parts.append(dict(np.load(found[-1])))
    keys = ["level1", "level2", "descriptor"] + sorted(k for k in parts[0] if k.startswith("ctx"))
    out = {k: np.concatenate([p[k] for p in parts], axis=1) for k in keys}
    for k in ("labels", "group", "names", "width", "age", "race", "p_v1"):
        out[k] = np.concatenate([p[k] for p in parts])
    out["source"] = np.concatenate([np.full(len(p["labels"]), i) for i, p in enumerate(parts)])
    return out


def folds(groups: np.ndarray, k: int = FOLDS) -> np.ndarray:
    """A fold per face from a hash of its group (stable across runs and machines)."""
    return np.array([int(hashlib.sha256(str(g).encode()).hexdigest()[:8], 16) % k for g in groups])


def weights(source: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sampling weights: every source the same total, each class half of its source."""
    w = np.zeros(len(labels))
    for s in np.unique(source):
        for c in (0, 1):
            m = (source == s) & (labels == c)
            if m.any():
                w[m] = 1.0 / m.sum()
    return w / w.sum()


# ------------------------------------------------------------------------------------- heads


def _dlib_layers() -> dict[str, dlibnet.Layer]:
    mdir = models.default_models_dir()
    spec = models.load_manifest(mdir).models["dlib-face-v1"]
    return {layer.name: layer for layer in dlibnet.parse((mdir / spec.filename).read_bytes()).layers}


def _load_block(block: Block, layers: dict[str, dlibnet.Layer], prefix: str) -> None:
    for i, conv in ((1, block.c1), (2, block.c2)):
        c, a = layers[f"{prefix}.conv{i}"], layers[f"{prefix}.affine{i}"]
        conv[0].weight.data = torch.from_numpy(np.asarray(c.weight).copy())
        conv[0].bias.data = torch.from_numpy(np.asarray(c.bias).copy())
        conv[1].scale.data = torch.from_numpy(np.asarray(a.gamma).reshape(1, -1, 1, 1).copy())
        conv[1].offset.data = torch.from_numpy(np.asarray(a.bias).reshape(1, -1, 1, 1).copy())


class Branch(nn.Module):
    """dlib's upper blocks (copied, then trained) + average pooling + one logit (p male)."""

    def __init__(self, start: str, dropout: float = 0.3) -> None:
        super().__init__()
        self.start = start
        blocks = [Block(256, 256, True)]
        if start == "level2":
            blocks = [Block(128, 256, True), Block(256, 256, False), Block(256, 256, False), *blocks]
        self.blocks = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(256, 1)

    def init_from_dlib(self) -> Branch:
        layers = _dlib_layers()
        names = ["level0.0"] if self.start == "level1" else ["level1.0", "level1.1", "level1.2", "level0.0"]
        for block, name in zip(self.blocks, names, strict=True):
            _load_block(block, layers, name)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(x).mean(dim=(2, 3))
        return self.fc(self.drop(y))[:, 0]


class ContextBranch(nn.Module):
    """Two copies of dlib's top block, one on the face chip's ``level1`` and one on a wider-context
    chip's (hair, ears, neck), pooled, concatenated, one logit."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.start = "level1"
        self.face, self.context = Block(256, 256, True), Block(256, 256, True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(512, 1)

    def init_from_dlib(self) -> ContextBranch:
        layers = _dlib_layers()
        _load_block(self.face, layers, "level0.0")
        _load_block(self.context, layers, "level0.0")
        return self

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.face(x).mean(dim=(2, 3)), self.context(c).mean(dim=(2, 3))], dim=1)
        return self.fc(self.drop(y))[:, 0]


class Logistic(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)[:, 0]


CANDIDATES = {
    "desc-logistic": {"input": "descriptor", "epochs": 12, "lr": 3e-3, "batch": 256},
    "branch-l0": {"input": "level1", "epochs": 6, "lr": 3e-4, "batch": 128},
    "branch-l1": {"input": "level2", "epochs": 5, "lr": 2e-4, "batch": 128},
    "ctx060-l0": {"input": "level1", "context": features.context_key(0.6), "epochs": 6, "lr": 3e-4, "batch": 128},
    "ctx100-l0": {"input": "level1", "context": features.context_key(1.0), "epochs": 6, "lr": 3e-4, "batch": 128},
}


def make(name: str) -> nn.Module:
    c = CANDIDATES[name]
    if c["input"] == "descriptor":
        return Logistic(128)
    if "context" in c:
        return ContextBranch().init_from_dlib()
    return Branch(c["input"]).init_from_dlib()


def inputs(name: str, d: dict[str, np.ndarray], rows: np.ndarray | slice = slice(None)) -> list[np.ndarray]:
    """The candidate's input arrays [views, n, ...] (the face's, then the context's), rows selected."""
    c = CANDIDATES[name]
    keys = [k for k in (c["input"], c.get("context")) if k]
    if any(k not in d for k in keys):
        raise SystemExit(f"{name} reads {keys}: run `python -m training.features --contexts 0.6 1.0` first")
    return [d[k][:, rows] for k in keys]


def fit(name: str, xs: list[np.ndarray], y: np.ndarray, w: np.ndarray, seed: int = 0) -> nn.Module:
    """Train candidate ``name`` on ``xs`` (each [views, n, ...]; a view drawn per face and input)
    with sampling weights ``w``."""
    c = CANDIDATES[name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = make(name)
    opt = torch.optim.AdamW(net.parameters(), lr=c["lr"], weight_decay=1e-2)
    steps_per_epoch = max(1, len(y) // c["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c["lr"], total_steps=c["epochs"] * steps_per_epoch)
    yt = torch.from_numpy(y.astype(np.float32))
    net.train()
    for _ in range(c["epochs"]):
        idx = rng.choice(len(y), size=steps_per_epoch * c["batch"], p=w)
        views = [rng.integers(0, x.shape[0], len(idx)) for x in xs]
        for b in range(steps_per_epoch):
            sl = slice(b * c["batch"], (b + 1) * c["batch"])
            xb = [torch.from_numpy(x[v[sl], idx[sl]].astype(np.float32)) for x, v in zip(xs, views, strict=True)]
            loss = F.binary_cross_entropy_with_logits(net(*xb), yt[idx[sl]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def logits(net: nn.Module, xs: list[np.ndarray], batch: int = 1024) -> np.ndarray:
    """Logits for view 0 of each input (``xs`` as :func:`inputs` gives them)."""
    n = xs[0].shape[1]
    return np.concatenate([net(*(torch.from_numpy(x[0, i:i + batch].astype(np.float32)) for x in xs)).numpy()
                           for i in range(0, n, batch)])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


# ------------------------------------------------------------------------------------- report


def temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The scalar T minimising the NLL of sigmoid(z / T) (grid + refinement)."""
    def nll(t: float) -> float:
        q = z / t
        return float(np.mean(np.logaddexp(0, q) - y * q))
    grid = np.exp(np.linspace(np.log(0.3), np.log(5), 60))
    best = min(grid, key=nll)
    fine = np.linspace(best * 0.9, best * 1.1, 41)
    return float(min(fine, key=nll))


def source_table(p: np.ndarray, d: dict[str, np.ndarray], margin: float = 0.0) -> dict[str, dict]:
    out = {}
    for s, src in enumerate(SOURCES):
        m = d["source"] == s
        pos = d["labels"][m] == 1
        call = p[m] >= 0.5
        tp, fp, fn = int((call & pos).sum()), int((call & ~pos).sum()), int((~call & pos).sum())
        row = {"n": int(m.sum()), "f1": 2 * tp / max(1, 2 * tp + fp + fn),
               "accuracy": float((call == pos).mean()), "roc_auc": metrics.roc_auc(pos, p[m]),
               "ci95": metrics.bootstrap_ci(pos, p[m], groups=d["group"][m], n_boot=300)}
        if margin:
            row["band"] = metrics.band_report(pos, p[m], margin=margin)
        if src == "wider":
            big = m & (d["width"] >= 32)
            posb, callb = d["labels"][big] == 1, p[big] >= 0.5
            tpb = int((callb & posb).sum())
            row["f1_ge32"] = 2 * tpb / max(1, 2 * tpb + int((callb & ~posb).sum()) + int((~callb & posb).sum()))
        out[src] = row
    return out


def cross_validate(d: dict[str, np.ndarray], names: list[str]) -> dict:
    fold = folds(d["group"])
    y = d["labels"].astype(np.int64)
    oof = {n: np.zeros(len(y)) for n in names}
    t0 = time.perf_counter()
    for k in range(FOLDS):
        tr, te = fold != k, fold == k
        w = weights(d["source"][tr], y[tr])
        for n in names:
            net = fit(n, inputs(n, d, tr), y[tr], w, seed=k)
            oof[n][te] = logits(net, inputs(n, d, te))
            log.info("fold %d %s done (%.0f s)", k, n, time.perf_counter() - t0)
    zv1 = _logit(d["p_v1"])
    table: dict[str, dict] = {"gender-v1": {"temperature": 1.0, "sources": source_table(d["p_v1"], d)}}
    for n in names:
        for name, z in ((n, oof[n]), (f"{n}+v1", (oof[n] + zv1) / 2)):
            t = temperature(z, y)
            p = 1 / (1 + np.exp(-z / t))
            table[name] = {"temperature": t, "ece": metrics.reliability(y == 1, p)[1],
                           "sources": source_table(p, d, margin=0.15),
                           "bands": {str(m): metrics.band_report(y == 1, p, margin=m) for m in BAND_MARGINS}}
    return {"folds": FOLDS, "seconds": round(time.perf_counter() - t0), "candidates": table,
            "oof": {n: oof[n].round(4).tolist() for n in names}}


def print_table(res: dict) -> None:
    cols = [*SOURCES, "wider>=32"]
    print("| candidate | T | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, c in res["candidates"].items():
        cells = []
        for src in SOURCES:
            r = c["sources"][src]
            lo, hi = (r["ci95"]["f1"] or [float("nan")] * 2)
            cells.append(f"{r['f1']:.3f} [{lo:.3f}, {hi:.3f}] AUC {r['roc_auc']:.3f}")
        cells.append(f"{c['sources']['wider'].get('f1_ge32', float('nan')):.3f}")
        print(f"| {name} | {c['temperature']:.2f} | " + " | ".join(cells) + " |")
    print("\nuncertain band |p - 0.5| < m, out of fold over all sources: share of faces inside / errors it holds / error rate outside")
    for name, c in res["candidates"].items():
        if "bands" in c:
            print(f"  {name}: " + "; ".join(f"m {m}: {b['inside_share']:.2f} / {b['errors_held']:.2f} / {b['error_outside']:.3f}"
                                          for m, b in c["bands"].items()))


# ------------------------------------------------------------------------------------- export


def export(net: Branch, path: Path, t: float) -> str:
    """ONNX: ``level1``/``level2`` [N, C, H, W] -> ``probabilities`` [N, 2] (female, male)."""
    import io

    import onnx

    from training.model import _fp16_initializers

    class Probs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.net(x) / t
            return torch.stack([torch.sigmoid(-z), torch.sigmoid(z)], dim=1)

    shape = (1, 256, 4, 4) if net.start == "level1" else (1, 128, 8, 8)
    buf = io.BytesIO()
    torch.onnx.export(Probs().eval(), (torch.zeros(shape),), buf, input_names=[net.start],
                      output_names=["probabilities"], dynamic_axes={net.start: {0: "N"}, "probabilities": {0: "N"}},
                      opset_version=17, dynamo=False)
    m = _fp16_initializers(onnx.load_from_string(buf.getvalue()))
    m.producer_name = "forensic-gender training.branch"
    onnx.checker.check_model(m)
    data = m.SerializeToString(deterministic=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=extract.DEFAULT_CACHE)
    ap.add_argument("--cv", nargs="*", default=None, metavar="CANDIDATE",
                    help=f"cross-validate these candidates (default all: {list(CANDIDATES)})")
    ap.add_argument("--final", choices=[n for n, c in CANDIDATES.items() if "context" not in c],
                    help="fit on all train faces and write the ONNX branch (the product reads no context chips)")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "gender-dlib-v1.onnx")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    d = load(a.cache)
    RUNS.mkdir(parents=True, exist_ok=True)
    if a.cv is not None:
        names = a.cv or list(CANDIDATES)
        res = cross_validate(d, names)
        (RUNS / f"branch-cv-{'-'.join(names)}.json").write_text(json.dumps(res))
        print_table(res)
    if a.final:
        runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("branch-cv-*.json"))]
        cv = next((r for r in runs if a.final in r["candidates"]), None)
        if cv is None:
            raise SystemExit(f"no cross-validation of {a.final} in {RUNS}: run `python -m training.branch --cv {a.final}` first")
        t = cv["candidates"][a.final]["temperature"]
        y = d["labels"].astype(np.int64)
        net = fit(a.final, inputs(a.final, d), y, weights(d["source"], y), seed=0)
        sha = export(net, a.out, t)
        print(json.dumps({"wrote": str(a.out), "sha256": sha, "bytes": a.out.stat().st_size, "temperature": t}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
