"""The validation report of ``forensic-gender evaluate``: JSON, markdown, PNG figures and one
self-contained HTML file (figures embedded as base64) that a lab can file with a case.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered
to markdown and HTML from the same blocks, so both always say the same thing. matplotlib is an
optional extra (``pip install 'forensic-gender[report]'``), imported only here and only when
figures are drawn; without it the report has no figures and says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NO_MATPLOTLIB = ("Figures omitted: matplotlib is not installed. Install the report extra "
                 "(pip install 'forensic-gender[report]') and run again to get the ROC curve and the reliability diagram.")
SUMMARY_HEADER = ("Method", "Trained on", "Precision", "Recall", "F1", "Accuracy", "AUC", "ECE", "Uncertain", "Det. recall")
DEFINITIONS = [
    "Gender: male is the positive class (as in the research project's tables). Precision, recall and F1 are over labelled "
    "faces the detector found, each called male when p(male) >= the gender threshold (no uncertain band); the "
    "'misses as errors' row also counts every labelled face the detector missed as wrong (recall and accuracy drop, "
    "precision does not change).",
    "Uncertain: share of found faces with |p(male) - threshold| < the uncertain margin; 'decided' figures are over the "
    "other faces only. ECE: expected calibration error of p(male) over 10 equal-width bins.",
    "Detection: a labelled box is found when a detection overlaps it at IoU >= 0.5 (greedy by detection score, one "
    "detection per box). In crop folders the labelled face is the detection nearest the image centre whose box contains "
    "the centre. Precision is a lower bound: real faces that nobody labelled count as false detections.",
    "Age: mean absolute error in years against numeric labels; the minor flag is an estimate under 18, scored against a "
    "label under 18. Face width is the labelled box's width in pixels.",
]


@dataclass(frozen=True)
class Block:
    """One piece of the report: ``kind`` is h1/h2/h3/p/table/figure/pre."""

    kind: str
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    png: bytes | None = None


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table: fixed decimals; '–' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def method_name(report: dict) -> str:
    """The gender model and the detector policy in a few words."""
    p = report["pipeline"]
    g, d = p["gender"], p["detector"]
    model = Path(g["model"]).name
    det = f"CenterFace@{d['max_side']}" + ("+tiles" if d.get("tile_side") else "") + f" t{d['threshold']:g}"
    return f"{model}{' flip-TTA' if g.get('flip_tta') else ''} ({det})"


def summary_rows(report: dict, folder: dict) -> list[tuple[str, ...]]:
    """The research table's rows for one folder: faces found, then misses counted as errors."""
    g = folder.get("gender")
    det = fmt(folder["detection"]["recall"])
    if not g:
        return [(method_name(report), report.get("trained_on", ""), "–", "–", "–", "–", "–", "–", "–", det)]
    m, w = g["metrics"], g["with_misses"]
    ece = (folder.get("calibration") or {}).get("ece")
    name = method_name(report)
    return [
        (f"{name}, faces found ({g['found']}/{g['labelled']})", report.get("trained_on", ""), fmt(m["precision"]), fmt(m["recall"]),
         fmt(m["f1"]), fmt(m["accuracy"]), fmt(g["roc_auc"]), fmt(ece), pct(g["uncertain_share"]), det),
        (f"{name}, misses as errors ({g['labelled']})", report.get("trained_on", ""), fmt(w["precision"]), fmt(w["recall"]),
         fmt(w["f1"]), fmt(w["accuracy"]), "–", "–", "–", det),
    ]


def folder_title(folder: dict) -> str:
    limit = "" if folder["images"] == folder["images_total"] else f" of {folder['images_total']}"
    return (f"{folder['name']}: {folder['images']}{limit} images ({folder['kind']}), {folder['labelled_faces']} labelled faces, "
            f"data {folder['data_hash'][:12]}")


def summary_text(report: dict) -> str:
    """What ``evaluate`` prints: one markdown table per folder in the research table's shape."""
    parts = []
    for f in report["folders"]:
        parts.append(f"## {folder_title(f)}\n\n" + _md_table(SUMMARY_HEADER, summary_rows(report, f)))
    return "\n\n".join(parts)


# --- blocks ----------------------------------------------------------------------------------

def build_blocks(report: dict, figures: dict[str, bytes] | None) -> list[Block]:
    """The whole report as blocks; ``figures`` None means matplotlib is missing."""
    run, pipe = report["run"], report["pipeline"]
    b: list[Block] = [Block("h1", "forensic-gender validation report")]
    b.append(Block("p", f"Pipeline evaluated on {len(report['folders'])} labelled folder(s) on {run['created']} on host "
                        f"{run['host']} with forensic-gender {run['version']}; model bundle {report.get('bundle_key') or '–'}."
                        + (f" Predictions re-scored from {report['reused_from']}." if report.get("reused_from") else "")
                        + (f" At most {report['limit']} images per folder (spread evenly)." if report.get("limit") else "")))
    b.append(Block("h2", "What was tested"))
    b.append(Block("table", header=("Folder", "Path", "Kind", "Images", "Labelled faces", "labels.csv sha256", "Data hash"), rows=tuple(
        (f["name"], f["path"], f["kind"], f"{f['images']} / {f['images_total']}", str(f["labelled_faces"]), f["labels_sha256"], f["data_hash"])
        for f in report["folders"])))
    b.append(Block("h2", "With which version"))
    models = ((report.get("bundle") or {}).get("models")) or {}
    rows = [("forensic-gender", run["version"]), ("host", run["host"]), ("date (UTC)", run["created"]),
            ("platform", run["platform"]), ("python / onnxruntime / numpy / opencv",
                                             f"{run['python']} / {run['onnxruntime']} / {run['numpy']} / {run['opencv']}"),
            ("configuration file", run.get("config_file") or "(defaults)"), ("model bundle key", report.get("bundle_key") or "–")]
    rows += [(f"model {k} sha256", v) for k, v in models.items()]
    d, g = pipe["detector"], pipe["gender"]
    rows += [("detector", f"threshold {d['threshold']}, NMS IoU {d['nms_iou']}, max side {d['max_side']}, tile side {d['tile_side'] or 'off'}, "
                          f"min face {d['min_face_px']} px"),
             ("gender", f"{g['model']} ({g['kind']}), threshold {g['threshold']}, uncertain margin {g['uncertain_margin']}, "
                        f"flip TTA {g['flip_tta']}; trained on: {report.get('trained_on')}"),
             ("age", f"{pipe['age']['model']}" if pipe["age"]["enabled"] else "disabled")]
    if run.get("command"):
        rows.append(("command", run["command"]))
    b.append(Block("table", header=("Item", "Value"), rows=tuple(rows)))
    b.append(Block("h2", "Results"))
    for f in report["folders"]:
        b += _folder_blocks(report, f)
    b.append(Block("h2", "Figures"))
    if figures is None:
        b.append(Block("p", NO_MATPLOTLIB))
    else:
        for name, png in figures.items():
            b.append(Block("figure", text=name, png=png))
    b.append(Block("h2", "Definitions"))
    b += [Block("p", t) for t in DEFINITIONS]
    return b


def _folder_blocks(report: dict, f: dict) -> list[Block]:
    b = [Block("h3", folder_title(f)), Block("table", header=SUMMARY_HEADER, rows=tuple(summary_rows(report, f)))]
    det = f["detection"]
    b.append(Block("p", f"Detection: {det['matched']} of {det['labelled']} labelled faces found (recall {fmt(det['recall'])}); "
                        f"{det['detections']} detections, {fmt(det['detections_per_image'], 2)} per image; precision at least "
                        f"{fmt(det['precision_lower_bound'])}."
                        + (f" Images not analysed: {f['failed_images']}." if f["failed_images"] else "")))
    if det.get("by_width"):
        b.append(Block("table", header=("Face width (px)", "Labelled", "Found", "Recall"), rows=tuple(
            (k, str(v["labelled"]), str(v["matched"]), fmt(v["recall"])) for k, v in det["by_width"].items())))
    g = f.get("gender")
    if g:
        c = g["confusion"]
        b.append(Block("p", f"Gender confusion (rows: truth; columns: prediction with the uncertain band; {g['found']} of "
                            f"{g['labelled']} gender-labelled faces found):"))
        b.append(Block("table", header=("Truth", "male", "female", "uncertain", "missed"), rows=tuple(
            (t, *(str(c[t][p]) for p in ("male", "female", "uncertain", "missed"))) for t in ("male", "female"))))
        m, dcd = g["metrics"], g["decided"]
        b.append(Block("p", f"Female precision {fmt(m['female_precision'])}, female recall {fmt(m['female_recall'])}. Outside the "
                            f"uncertain band ({pct(g['uncertain_share'])} of found faces inside it): precision {fmt(dcd['precision'])}, "
                            f"recall {fmt(dcd['recall'])}, F1 {fmt(dcd['f1'])}, accuracy {fmt(dcd['accuracy'])} over {dcd['n']} faces."))
        for key, title in (("by_width", "Gender by face width (px)"), ("by_age_group", "Gender by age group")):
            if g.get(key):
                b.append(Block("table", header=(title, "Labelled", "Found", "Precision", "Recall", "F1", "Accuracy", "AUC", "Uncertain",
                                                "F1 (misses as errors)"), rows=tuple(
                    (k, str(v["labelled"]), str(v["found"]), fmt(v["metrics"]["precision"]), fmt(v["metrics"]["recall"]),
                     fmt(v["metrics"]["f1"]), fmt(v["metrics"]["accuracy"]), fmt(v["roc_auc"]), pct(v["uncertain_share"]),
                     fmt(v["with_misses"]["f1"])) for k, v in g[key].items())))
        cal = f.get("calibration")
        if cal:
            b.append(Block("p", f"Calibration of p(male): ECE {fmt(cal['ece'])}."))
            b.append(Block("table", header=("p(male) bin", "Faces", "Mean p(male)", "Fraction male"), rows=tuple(
                (f"{x['lo']:.1f}-{x['hi']:.1f}", str(x["n"]), fmt(x["mean_p"]), fmt(x["frac_positive"])) for x in cal["bins"])))
    a = f.get("age")
    if a:
        b.append(Block("p", f"Age: {a['estimated']} of {a['labelled']} age-labelled faces found and estimated; MAE {fmt(a['mae'], 2)} "
                            f"years. Minor flag (estimate < 18 vs label < 18): precision {fmt(a['minor_precision'])}, recall "
                            f"{fmt(a['minor_recall'])} ({a['minor_tp']} true, {a['minor_fp']} false alarms, {a['minor_fn']} missed minors)."))
        b.append(Block("table", header=("Age band (label)", "Faces", "MAE (years)"), rows=tuple(
            (k, str(v["n"]), fmt(v["mae"], 2)) for k, v in a["mae_by_band"].items())))
    s = f.get("seconds_per_image")
    if s:
        rate = f" ({fmt(f['images_per_second'], 1)} images/s in all)" if f.get("images_per_second") else ""
        b.append(Block("p", f"Time per image in a worker: decode {1000 * s['read_decode']:.0f} ms, detection {1000 * s['detect']:.0f} ms, "
                            f"classification {1000 * s['classify']:.0f} ms{rate}."))
    return b


# --- rendering -------------------------------------------------------------------------------

def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(header: tuple[str, ...], rows: Any) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "table":
            out.append(_md_table(b.header, b.rows))
        elif b.kind == "figure":
            out.append(f"![{b.text}]({b.text})")
        elif b.kind == "pre":
            out.append("```\n" + b.text + "\n```")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #bbb;padding:.25em .5em;text-align:left}
th{background:#eee}td{font-variant-numeric:tabular-nums;word-break:break-all}h1{border-bottom:2px solid #333}
h3{margin-top:2em;border-bottom:1px solid #ccc}img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}"""


def render_html(blocks: list[Block]) -> str:
    """One self-contained HTML page (inline CSS, figures as data: URIs, nothing fetched)."""
    e = html.escape
    title = next((b.text for b in blocks if b.kind == "h1"), "validation report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b.rows]
            out.append("</tbody></table>")
        elif b.kind == "figure" and b.png is not None:
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}"><figcaption>{e(b.text)}</figcaption></figure>')
        elif b.kind == "pre":
            out.append(f"<pre>{e(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def draw_figures(report: dict) -> dict[str, bytes] | None:
    """``roc.png`` and ``reliability.png`` (one curve per folder), or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: the report has no figures (pip install 'forensic-gender[report]')")
        return None
    folders = [f for f in report["folders"] if f.get("roc")]
    if not folders:
        return {}

    def png(fig: Figure) -> bytes:
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return buf.getvalue()

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for f in folders:
        ax.plot(f["roc"]["fpr"], f["roc"]["tpr"], label=f"{f['name']} (AUC {fmt(f['gender']['roc_auc'])})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="false positive rate (female called male)", ylabel="true positive rate (male called male)",
           title="ROC of p(male), faces found", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    out = {"roc.png": png(fig)}

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for f in folders:
        bins = [x for x in f["calibration"]["bins"] if x["n"]]
        total = sum(x["n"] for x in bins) or 1
        (line,) = ax.plot([x["mean_p"] for x in bins], [x["frac_positive"] for x in bins], alpha=0.6,
                          label=f"{f['name']} (ECE {fmt(f['calibration']['ece'])})")
        ax.scatter([x["mean_p"] for x in bins], [x["frac_positive"] for x in bins], s=[8 + 400 * x["n"] / total for x in bins],
                   color=line.get_color(), alpha=0.8)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="mean p(male) in bin", ylabel="fraction male in bin",
           title="Reliability of p(male), 10 bins (marker area: share of faces)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="upper left")
    out["reliability.png"] = png(fig)
    return out


def write_all(report: dict, out: Path) -> list[str]:
    """Write report.json, report.md, report.html and the PNGs into ``out``; returns the names."""
    out = Path(out)
    figures = draw_figures(report)
    names = []
    for name, data in (figures or {}).items():
        (out / name).write_bytes(data)
        names.append(name)
    if figures is None:
        report["notes"] = [*report.get("notes", []), NO_MATPLOTLIB]
    blocks = build_blocks(report, figures)
    files = ["report.json", "report.md", "report.html", *names]
    report["files"] = files
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(render_html(blocks), encoding="utf-8")
    return files
