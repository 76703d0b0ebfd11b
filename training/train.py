"""Train ``gender-wild-v1``: a gender classifier for faces in the wild (PyTorch, CPU).

    python -m training.train                      # = make train

Steps (all seeded; the same command on the same data gives the same weights up to float
reduction order):

1. chips: :func:`training.extract.extract` cuts aligned 64x64 chips (+8 px margin) from
   ``../shared/data/train`` with the product's detector and alignment (cached in
   ``var/train-cache``);
2. split: 10% of the groups (WIDER scenes, LFW people, UTKFace files) are held out, by a hash
   of the group name, for calibration and monitoring; never ``dev``;
3. fit: age-v1's trunk (CC0) with a new 2-way head, its stem and first block frozen; 8 epochs
   of 9,600 chips drawn WIDER 50% / UTKFace 25% / LFW 25%, each source half male, half female
   (weighted sampling with replacement); evidence-photo augmentation (:mod:`training.augment`);
   AdamW, one-cycle learning rate, cross-entropy;
4. calibrate: one temperature T minimising the negative log-likelihood on the held-out chips,
   weighted so that every source and gender counts equally; T is baked into the graph
   (softmax(logits / T));
5. export: ``models/gender-wild-v1.onnx`` (opset 17, dynamic batch, ``images`` ->
   ``probabilities`` [female, male], weights stored as float16) and a run summary (held-out
   figures, T, timings, sha256) in ``var/train-runs/``; the manifest entry's ``sha256`` and
   ``bytes`` are updated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from training import augment as aug
from training import extract, model

log = logging.getLogger("training.train")

ROOT = Path(__file__).resolve().parents[1]
MEANS_RGB = np.array([122.782, 117.001, 104.298], np.float32)
SCALE = 1 / 256
SOURCE_SHARE = {"wider": 0.5, "utkface": 0.25, "lfw": 0.25}


def to_tensor(chips_bgr: np.ndarray) -> torch.Tensor:
    """uint8 BGR (N,S,S,3) -> float32 RGB (N,3,S,S), (byte - mean) / 256 (as the product)."""
    x = (chips_bgr[..., ::-1].astype(np.float32) - MEANS_RGB) * SCALE
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def heldout_mask(groups: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic split by group name (crc32), so one scene/person never straddles it."""
    h = np.array([zlib.crc32(str(g).encode()) % 10000 for g in groups])
    return h < fraction * 10000


def sample_weights(labels: np.ndarray, source: np.ndarray, sources: list[str]) -> np.ndarray:
    w = np.zeros(len(labels), np.float64)
    for s_idx, name in enumerate(sources):
        for g in (0, 1):
            cell = (source == s_idx) & (labels == g)
            if cell.any():
                w[cell] = SOURCE_SHARE.get(name, 0.0) / 2 / cell.sum()
    return w / w.sum()


def predict_logits(net: torch.nn.Module, chips: np.ndarray, size: int, batch: int = 256) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(chips), batch):
            c = np.stack([aug.centre(x, size) for x in chips[i : i + batch]])
            out.append(net(to_tensor(c)).numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def binary_metrics(p_male: np.ndarray, y: np.ndarray) -> dict:
    """F1 (male positive), accuracy, ROC-AUC, ECE (10 bins over p(male))."""
    pred = p_male >= 0.5
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    # ROC-AUC by the rank statistic
    order = np.argsort(p_male, kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    npos, nneg = int((y == 1).sum()), int((y == 0).sum())
    auc = (ranks[y == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg) if npos and nneg else float("nan")
    bins = np.minimum((p_male * 10).astype(int), 9)
    ece = sum(abs(p_male[bins == b].mean() - (y[bins == b] == 1).mean()) * (bins == b).sum()
              for b in range(10) if (bins == b).any()) / max(len(y), 1)
    return {"n": int(len(y)), "f1": round(f1, 4), "accuracy": round(float(np.mean(pred == (y == 1))), 4),
            "precision": round(prec, 4), "recall": round(rec, 4), "auc": round(float(auc), 4), "ece": round(float(ece), 4)}


def fit_temperature(logits: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """argmin_T of the weighted NLL of softmax(logits / T) (golden-section search on log T)."""
    z = torch.from_numpy(logits.astype(np.float64))
    yt = torch.from_numpy(y.astype(np.int64))
    wt = torch.from_numpy(w / w.sum())

    def nll(log_t: float) -> float:
        return float((F.cross_entropy(z / math.exp(log_t), yt, reduction="none") * wt).sum())

    lo, hi = math.log(0.25), math.log(8.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    return round(math.exp((lo + hi) / 2), 4)


def evaluate_heldout(logits: np.ndarray, y: np.ndarray, source: np.ndarray, sources: list[str], t: float) -> dict:
    p = torch.softmax(torch.from_numpy(logits) / t, 1)[:, 1].numpy().astype(np.float64)
    res = {"all": binary_metrics(p, y)}
    for s_idx, name in enumerate(sources):
        m = source == s_idx
        if m.any():
            res[name] = binary_metrics(p[m], y[m])
    return res


def train(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # age-v1's weights give denormal activations: 10x slower without
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    cache = extract.extract(args.data.resolve(), args.cache, args.size, args.margin, args.min_iou, args.limit)
    z = np.load(cache)
    meta = json.loads(str(z["meta"]))
    sources = meta["sources"]
    chips, labels, source = z["chips"], z["labels"], z["source"]
    held = heldout_mask(z["group"], args.heldout)
    fit_idx, held_idx = np.nonzero(~held)[0], np.nonzero(held)[0]
    log.info("chips %d (fit %d, held-out %d) from %s; extraction %s", len(labels), len(fit_idx), len(held_idx),
             cache.name, json.dumps(meta["stats"]))
    t_extract = time.perf_counter() - t_start

    net = model.from_onnx(args.init, outputs=2, dropout=args.dropout)
    frozen = [m for m in ("stem", "b1")[: args.freeze]]
    for name in frozen:  # the 64-channel, high-resolution layers: generic edges; a third less compute
        for p in getattr(net, name).parameters():
            p.requires_grad_(False)
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if n.startswith("fc.")]
    decay = [p for n, p in trainable if not n.startswith("fc.") and p.ndim == 4]
    other = [p for n, p in trainable if not n.startswith("fc.") and p.ndim != 4]
    opt = torch.optim.AdamW([
        {"params": decay, "lr": args.lr, "weight_decay": args.weight_decay},
        {"params": other, "lr": args.lr, "weight_decay": 0.0},
        {"params": head, "lr": args.lr * args.head_lr_mult, "weight_decay": args.weight_decay},
    ])
    w = sample_weights(labels[fit_idx], source[fit_idx], sources)
    per_epoch = args.samples_per_epoch or len(fit_idx)
    steps_per_epoch = per_epoch // args.batch
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=0.15,
        div_factor=10, final_div_factor=100)
    history = []
    for epoch in range(args.epochs):
        net.train()
        t0 = time.perf_counter()
        draw = fit_idx[rng.choice(len(fit_idx), size=steps_per_epoch * args.batch, replace=True, p=w)]
        run_loss = run_acc = 0.0
        for step in range(steps_per_epoch):
            idx = draw[step * args.batch : (step + 1) * args.batch]
            x = to_tensor(np.stack([aug.augment(chips[i], args.size, rng) for i in idx]))
            y = torch.from_numpy(labels[idx])
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += float(loss.detach())
            run_acc += float((logits.argmax(1) == y).float().mean())
            if (step + 1) % 50 == 0:
                log.info("epoch %d step %d/%d loss %.4f acc %.4f (%.0f s)", epoch + 1, step + 1, steps_per_epoch,
                         run_loss / (step + 1), run_acc / (step + 1), time.perf_counter() - t0)
        hl = predict_logits(net, chips[held_idx], args.size)
        ev = evaluate_heldout(hl, labels[held_idx], source[held_idx], sources, 1.0)
        rec = {"epoch": epoch + 1, "loss": round(run_loss / steps_per_epoch, 4), "acc": round(run_acc / steps_per_epoch, 4),
               "seconds": round(time.perf_counter() - t0, 1), "heldout": {k: v["f1"] for k, v in ev.items()}}
        history.append(rec)
        log.info("epoch %s", json.dumps(rec))

    # calibration on the held-out part of TRAIN, each source and gender weighted equally
    hl = predict_logits(net, chips[held_idx], args.size)
    hy, hs = labels[held_idx], source[held_idx]
    cw = np.zeros(len(hy))
    for s_idx in range(len(sources)):
        for g in (0, 1):
            cell = (hs == s_idx) & (hy == g)
            if cell.any():
                cw[cell] = 1.0 / cell.sum()
    temperature = fit_temperature(hl, hy, cw)
    before = evaluate_heldout(hl, hy, hs, sources, 1.0)
    after = evaluate_heldout(hl, hy, hs, sources, temperature)
    log.info("temperature %.4f; held-out before %s after %s", temperature, json.dumps(before), json.dumps(after))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.export_onnx(net, args.out, temperature=temperature)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    run_dir = args.runs / f"{args.out.stem}-seed{args.seed}-{digest[:12]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run_dir / "state_dict.pt")
    summary = {
        "output": str(args.out), "sha256": digest, "bytes": args.out.stat().st_size, "temperature": temperature,
        "cache": cache.name, "extraction": meta["stats"], "fit_chips": int(len(fit_idx)), "heldout_chips": int(len(held_idx)),
        "heldout_T1": before, "heldout_calibrated": after, "history": history,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": {"extract_or_load": round(t_extract, 1), "total": round(time.perf_counter() - t_start, 1)},
        "torch": torch.__version__,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.manifest is not None:
        update_manifest(args.manifest, args.out, digest)
    log.info("wrote %s (%d bytes, sha256 %s); summary in %s", args.out, summary["bytes"], digest, run_dir)
    return summary


def update_manifest(manifest: Path, onnx_path: Path, digest: str) -> None:
    """Point the manifest entry named after the file (``gender-wild-v1``) at the new weights:
    ``sha256`` and ``bytes``, edited in place so the rest of the file keeps its layout (the rest of
    the entry is written by hand once)."""
    import re

    text = manifest.read_text(encoding="utf-8")
    entry = json.loads(text)["models"].get(onnx_path.stem)
    start = text.find(f'"{onnx_path.stem}": {{')
    if entry is None or entry.get("filename") != onnx_path.name or start < 0:
        log.warning("%s has no entry for %s; add it by hand (see models/gender-wild-v1.md)", manifest, onnx_path.name)
        return
    head, tail = text[:start], text[start:]
    tail = re.sub(r'"sha256": "[0-9a-f]{64}"', f'"sha256": "{digest}"', tail, count=1)
    tail = re.sub(r'"bytes": \d+', f'"bytes": {onnx_path.stat().st_size}', tail, count=1)
    doc = json.loads(head + tail)
    assert doc["models"][onnx_path.stem]["sha256"] == digest
    manifest.write_text(head + tail, encoding="utf-8")
    log.info("updated %s: %s sha256 %s", manifest, onnx_path.stem, digest)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train gender-wild-v1 (see training/README.md).")
    ap.add_argument("--data", type=Path, default=extract.DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=extract.DEFAULT_CACHE)
    ap.add_argument("--runs", type=Path, default=ROOT / "var" / "train-runs")
    ap.add_argument("--init", type=Path, default=ROOT / "models" / "age-v1.onnx", help="age-v1.onnx (its trunk is the start)")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "gender-wild-v1.onnx")
    ap.add_argument("--manifest", type=Path, default=ROOT / "models" / "manifest.json",
                    help="update this manifest's entry for the output (sha256, bytes); '' to skip")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--margin", type=int, default=8)
    ap.add_argument("--min-iou", type=float, default=0.4)
    ap.add_argument("--limit", type=int, default=None, help="first N rows per source (smoke tests)")
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples-per-epoch", type=int, default=9600, help="chips drawn per epoch (0: the fit part's size)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--head-lr-mult", type=float, default=5.0)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--freeze", type=int, default=2, help="freeze the first N of (stem, b1) (default 2: both)")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.manifest is not None and str(args.manifest) in ("", "."):
        args.manifest = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
