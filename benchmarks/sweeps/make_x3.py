"""Upscale 60 evenly spread WIDER scenes 3x (a ~7 MP 'large photo' proxy) with scaled boxes."""
import csv, sys
from pathlib import Path
import cv2
from daemon.evaluate import load_labelled, select
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
chosen = {i.file for i in select(load_labelled(src).images, 60)}
rows = [r for r in csv.DictReader(open(src / "labels.csv")) if r["file"] in chosen]
(dst / "images").mkdir(parents=True, exist_ok=True)
for f in chosen:
    im = cv2.imread(str(src / "images" / f))
    out = dst / "images" / f
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.resize(im, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC), [cv2.IMWRITE_JPEG_QUALITY, 95])
with open(dst / "labels.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        for k in ("x1", "y1", "x2", "y2", "img_w", "img_h"):
            r[k] = str(int(r[k]) * 3)
        w.writerow(r)
print(len(chosen), len(rows))
