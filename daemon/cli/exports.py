"""The export commands: ``export`` (the faces of a query as CSV, JSON, JSONL or Project VIC VICS
JSON, streamed), ``annotate`` (the stored faces drawn on an image) and ``crops`` (face crops into a
folder). They only read the database; their output files are opened as :mod:`daemon.cli.queries`
says, never inside an evidence root."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any

from daemon.cli.errors import CliError, guarded
from daemon.cli.queries import _common, _csv_raw, _cut_filters, _find, _guard, _head, _open_out, _roots, _setup, _target, _write_rows
from daemon.paths import show
from daemon.queries.formats import FACE_COLUMNS, _faces_to_draw, _media_groups, csv_cell, csv_writer, face_record, on_frame


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.queries import read, vics
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    if args.format == "vics":
        from dataclasses import replace

        f = replace(f, sort="sha256")
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn, engine.connect() as side:
            sc = read.scope(conn, f, cut)
            read.check_position(f)  # every filter checked before the output file is created
            roots = _roots(cfg, side)
            out = _open_out(args.output, _guard(roots, side))
            try:
                rows = read.faces(conn, f, sc, stream=True)
                if args.format == "vics":
                    hasher = _sha1_reader(side, roots, cfg) if args.hash_files else None
                    groups = _media_groups(side, rows, hasher)
                    n = vics.write(out, groups, cut={"threshold": sc.cut.threshold, "margin": sc.cut.margin},
                                   case_id=args.case_id, case_number=args.case_number)
                    what = "media record(s)"
                else:
                    n = _write_rows(out, args.format, "faces", _head(cfg, f, sc), FACE_COLUMNS, (face_record(r) for r in rows),
                                    csv_raw=args.csv_raw)
                    what = "face(s)"
            finally:
                if out is not sys.stdout:
                    out.close()
    finally:
        engine.dispose()
    if args.output not in (None, "-"):
        print(f"{n} {what} written to {show(args.output)}", file=sys.stderr)
    return 0


def _sha1_reader(side, roots, cfg):  # noqa: ANN001, ANN202
    from daemon import paths
    from daemon.pipeline import images, reading
    from daemon.queries.media import inside

    def sha1(sha256: str) -> str | None:
        from sqlalchemy import select

        from daemon.store import schema as s

        for path, root in side.execute(select(s.files.c.path, s.files.c.root).join(s.images, s.images.c.id == s.files.c.image_id)
                                       .where(s.images.c.sha256 == sha256).order_by(s.files.c.id)):
            real, real_root = os.path.realpath(paths.to_os(path)), os.path.realpath(paths.to_os(root))
            if not (inside(real, [real_root]) and inside(real_root, roots)):
                continue
            try:
                fb = reading.read_file(real, max_bytes=cfg.pipeline.limits.max_file_bytes, root=real_root)
            except images.ImageError:
                continue
            if fb.sha256 == sha256:
                return hashlib.sha1(fb.data, usedforsecurity=False).hexdigest()
        print(f"forensic-gender export: {sha256[:16]}...: no readable copy with that content; SHA1 left out", file=sys.stderr)
        return None

    return sha1


def annotated_jpeg(conn, sha256: str, rows: list[dict], roots: list[str], cfg, ext: str = ".jpg", frame: int | None = None) -> bytes:  # noqa: ANN001
    """The image (a video's ``frame``) with the stored boxes drawn (no re-analysis), encoded."""
    from daemon.queries import media
    from daemon.render import draw_faces, encode

    loaded = media.load(conn, sha256, roots, max_bytes=cfg.pipeline.limits.max_file_bytes, max_pixels=cfg.pipeline.limits.max_pixels,
                        frame=frame)
    return encode(draw_faces(loaded.decoded.bgr, _faces_to_draw(rows)), ext)


def cmd_annotate(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from daemon.queries import output, read
    from daemon.queries.filters import Filters
    from daemon.store import schema
    from daemon.store.engine import open_engine

    cfg, _, cut = _setup(args, need_filters=False)
    f = _cut_filters(args, args.bundle)
    target = _target(args.target)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            sc = read.scope(conn, f, cut)
            roots = _roots(cfg, conn)
            image_id, _ = _find(conn, args.target, target)
            sha = conn.execute(select(schema.images.c.sha256).where(schema.images.c.id == image_id)).scalar_one()
            rows = list(read.faces(conn, Filters(sha256=(sha,), bundle=f.bundle, threshold=f.threshold, margin=f.margin, sort="sha256"), sc))
            if args.frame is not None and all(r.get("frame") is None for r in rows) and not _is_video(conn, image_id, sc):
                raise CliError(f"--frame {args.frame}: {args.target} is a photo, not a video; leave --frame out")
            frame, rows = on_frame(rows, args.frame)  # a video: --frame, else the frame of its first face
            out = os.fsencode(args.output)
            if out.endswith(b"/") or os.path.isdir(out):
                tag = "" if frame is None else f".f{frame}"
                out = os.path.join(out, f"{sha[:16]}{tag}.annotated.jpg".encode())
            ext = os.path.splitext(out)[1].lower().decode("ascii", "replace")
            if ext not in (".jpg", ".jpeg", ".png"):
                raise CliError(f"-o {args.output}: the output must end in .jpg, .jpeg or .png (or be a folder), got {ext or 'no extension'!r}")
            guard = _guard(roots, conn)
            output.refuse_in_root(os.path.abspath(out), guard, "-o")  # before the work; checked again on the opened file
            data = annotated_jpeg(conn, sha, rows, roots, cfg, ext if ext != ".jpeg" else ".jpg", frame)
            output.write_bytes(out, data, guard, "-o", replace=args.force, make_parents=True)
    finally:
        engine.dispose()
    bundle = rows[0]["bundle"] if rows else "-"
    at = "" if frame is None else f", frame {frame}"
    print(f"{show(os.fsdecode(out))}: {len(rows)} face(s) drawn from bundle {bundle} (image {sha[:16]}...{at})")
    return 0


def _is_video(conn, image_id: int, sc) -> bool:  # noqa: ANN001
    from daemon.store import videos

    return bool(sc.videos and videos.lookup(conn, [image_id]))


def crop_name(row: dict) -> str:
    """Crop file names sort by content, then bundle, then face, and trace back to both."""
    return f"{row['sha256']}_{row['bundle']}_{row['idx']:03d}.jpg"


def cmd_crops(args: argparse.Namespace) -> int:
    import math
    from dataclasses import replace

    from daemon.queries import media, output, read
    from daemon.render import crop, encode
    from daemon.store.engine import open_engine

    cfg, f, cut = _setup(args)
    if not (math.isfinite(args.context) and 0 <= args.context <= 5):
        raise CliError(f"--context must be a fraction of the box from 0 to 5, got {args.context}")
    if not 1 <= args.min_side <= 4096:
        raise CliError(f"--min-side must be from 1 to 4096 pixels, got {args.min_side}")
    f = replace(f, sort="sha256")
    engine = open_engine(cfg.database, readonly=True)
    written = skipped = 0
    try:
        with engine.connect() as conn, engine.connect() as side:
            sc = read.scope(conn, f, cut)
            roots = _roots(cfg, side)
            read.check_position(f)  # every filter checked before the output folder is created
            guard = _guard(roots, side)
            dfd = output.open_dir(args.out, guard, "--out")
            try:
                index = output.open_text(b"crops.csv", guard, "--out", dir_fd=dfd)
                w = csv_writer(index)
                w.writerow(["file", *FACE_COLUMNS])
                cell = (lambda v: v) if args.csv_raw else csv_cell
                loaded_sha, loaded, failed_sha = None, None, None
                try:
                    for r in read.faces(conn, f, sc, stream=True):
                        if args.frame is not None and r.get("frame") != args.frame:
                            continue
                        if r["sha256"] == failed_sha:
                            skipped += 1
                            continue
                        if (r["sha256"], r.get("frame")) != loaded_sha:
                            try:
                                loaded = media.load(side, r["sha256"], roots, max_bytes=cfg.pipeline.limits.max_file_bytes,
                                                    max_pixels=cfg.pipeline.limits.max_pixels, frame=r.get("frame"))
                                loaded_sha = (r["sha256"], r.get("frame"))
                            except media.MediaError as err:
                                print(f"forensic-gender crops: skipped: {show(err.message)}", file=sys.stderr)
                                failed_sha, skipped = r["sha256"], skipped + 1
                                continue
                        name = crop_name(r)
                        box = (r["x1"], r["y1"], r["x2"], r["y2"])
                        data = encode(crop(loaded.decoded.bgr, box, margin=args.context, min_side=args.min_side))
                        output.write_bytes(name.encode(), data, guard, "--out", dir_fd=dfd)
                        rec = face_record(r)
                        w.writerow([name, *["" if rec[c] is None else cell(rec[c]) for c in FACE_COLUMNS]])
                        written += 1
                finally:
                    index.close()
            finally:
                os.close(dfd)
    finally:
        engine.dispose()
    print(f"{written} crop(s) written to {show(args.out)} (index: crops.csv)"
          + (f"; {skipped} face(s) skipped, image not readable" if skipped else ""))
    return 1 if skipped else 0

# --------------------------------------------------------------------------------------------


def register_cli(sub: Any) -> None:
    from daemon.cliargs import add_config_args
    from daemon.queries.filters import add_filter_args

    p = sub.add_parser("export", help="export the faces of a query as CSV, JSON, JSONL or Project VIC VICS JSON (streamed)")
    _common(p, ("csv", "json", "jsonl", "vics"), "csv")
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: standard output); never inside an evidence root")
    p.add_argument("--hash-files", action="store_true", help="vics: read each image again to add its SHA1 (the database keeps MD5 and SHA-256)")
    p.add_argument("--case-id", help="vics: write the case layout with this CaseID (default: the hash-set Media layout)")
    p.add_argument("--case-number", help="vics: write the case layout with this CaseNumber")
    add_filter_args(p, limit=None)
    p.set_defaults(func=guarded(cmd_export))

    p = sub.add_parser("annotate", help="draw the stored faces on an image (no re-analysis) into a new file")
    p.add_argument("target", metavar="PATH|SHA256")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output .jpg/.png file or folder; never inside an evidence root")
    add_config_args(p)
    p.add_argument("--bundle", default="latest", help="which analysis: latest (default) or a bundle key")
    p.add_argument("--threshold", type=float)
    p.add_argument("--margin", type=float)
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--frame", type=int, metavar="N", help="a video: the frame to draw (its faces' `frame`; default: the first face's)")
    p.set_defaults(func=guarded(cmd_annotate))

    p = sub.add_parser("crops", help="write face crops of a query into a folder, named <sha256>_<bundle>_<face>.jpg, with crops.csv")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; never inside an evidence root")
    add_config_args(p)
    p.add_argument("--context", type=float, default=0.3, help="context around the box on each side, as a fraction of its size (default 0.3)")
    p.add_argument("--min-side", type=int, default=96, help="upscale small crops to at least this many pixels (default 96)")
    p.add_argument("--frame", type=int, metavar="N", help="videos: only the faces found in frame N (their `frame`)")
    _csv_raw(p)
    add_filter_args(p, limit=None)
    p.set_defaults(func=guarded(cmd_crops))
