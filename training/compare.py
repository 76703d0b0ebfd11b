"""Side-by-side dev table of several ``forensic-gender evaluate`` runs (for the model card).

    python -m training.compare reports/eval-gender-v1 reports/eval-gender-wild-v1

Per folder and model: faces found, F1 (male positive), accuracy, male / female recall, ROC-AUC,
ECE of p(male), the uncertain share; for scene folders also F1 / AUC over faces of 32 px and
more (the "32-63" and ">=64" width bands pooled).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _f1(tp: float, fp: float, fn: float) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def _pooled(by_width: dict, bands: tuple[str, ...]) -> dict:
    tp = fp = fn = tn = 0
    for b in bands:
        m = (by_width.get(b) or {}).get("metrics") or {}
        tp, fp, fn, tn = tp + m.get("tp", 0), fp + m.get("fp", 0), fn + m.get("fn", 0), tn + m.get("tn", 0)
    n = tp + fp + fn + tn
    return {"n": n, "f1": _f1(tp, fp, fn), "accuracy": (tp + tn) / n if n else None,
            "male_recall": tp / (tp + fn) if tp + fn else None, "female_recall": tn / (tn + fp) if tn + fp else None}


def rows(report_dirs: list[Path]) -> list[dict]:
    out = []
    for d in report_dirs:
        r = json.loads((d / "report.json").read_text(encoding="utf-8"))
        model = r["pipeline"]["gender"]["model"]
        for f in r["folders"]:
            g, m = f["gender"], f["gender"]["metrics"]
            row = {"folder": f["name"], "model": Path(model).name, "found": g["found"], "labelled": g["labelled"],
                   "f1": m["f1"], "accuracy": m["accuracy"], "male_recall": m["recall"], "female_recall": m["female_recall"],
                   "auc": g["roc_auc"], "ece": f["calibration"]["ece"], "uncertain": g["uncertain_share"],
                   "f1_ci": (g.get("ci95") or {}).get("f1"), "auc_ci": (g.get("ci95") or {}).get("roc_auc"),
                   "bands": {b: (v.get("metrics") or {}).get("f1") for b, v in (g.get("by_width") or {}).items()}}
            if g.get("by_width"):
                p = _pooled(g["by_width"], ("32-63", ">=64"))
                row.update({"n_ge32": p["n"], "f1_ge32": p["f1"], "acc_ge32": p["accuracy"],
                            "male_recall_ge32": p["male_recall"], "female_recall_ge32": p["female_recall"]})
            out.append(row)
    return sorted(out, key=lambda x: (x["folder"], x["model"]))


def markdown(table: list[dict]) -> str:
    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    def ci(v: list[float] | None) -> str:
        return "" if not v else f" [{v[0]:.3f}, {v[1]:.3f}]"

    head = "| folder | model | found / labelled | F1 [95% CI] | accuracy | male recall | female recall | ROC-AUC | ECE | uncertain | F1 >= 32 px (n) |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|---|\n"
    lines = [
        f"| {r['folder']} | {r['model']} | {r['found']} / {r['labelled']} | {f(r['f1'])}{ci(r['f1_ci'])} | {f(r['accuracy'])} | "
        f"{f(r['male_recall'])} | {f(r['female_recall'])} | {f(r['auc'])}{ci(r['auc_ci'])} | {f(r['ece'])} | {f(r['uncertain'])} | "
        + (f"{f(r['f1_ge32'])} ({r['n_ge32']})" if "f1_ge32" in r else "–") + " |"
        for r in table
    ]
    bands = sorted({b for r in table for b in r["bands"]}, key=lambda b: (len(b), b))
    banded = [r for r in table if r["bands"]]
    if banded:
        lines.append("\n| folder | model | " + " | ".join(f"F1 {b} px" for b in bands) + " |")
        lines.append("|---|---|" + "---|" * len(bands))
        lines += [f"| {r['folder']} | {r['model']} | " + " | ".join(f(r["bands"].get(b)) for b in bands) + " |" for r in banded]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="--out folders of forensic-gender evaluate")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    t = rows(a.reports)
    print(json.dumps(t, indent=2) if a.json else markdown(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
