"""The local commands: ``scan`` (a folder into the database, then stop), ``analyze`` (single images,
no database; ``--annotate`` writes annotated copies) and ``check-config``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from daemon.cli.errors import guarded
from daemon.cliargs import add_config_args, load_config
from daemon.paths import show, to_db

if TYPE_CHECKING:
    from daemon import config as config_mod

log = logging.getLogger("daemon")


def register_cli(sub: Any) -> None:
    p = sub.add_parser("scan", help="analyse every image under PATHs into the database, then stop")
    p.add_argument("paths", nargs="+", metavar="PATH")
    add_config_args(p)
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=guarded(cmd_scan))

    p = sub.add_parser("analyze", help="analyse single images and print the faces (no database)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_config_args(p, db=False)
    p.add_argument("--json", action="store_true", help="one JSON document per image")
    p.add_argument("--annotate", metavar="OUT_DIR", help="write annotated copies into OUT_DIR (never next to the input)")
    p.set_defaults(func=guarded(cmd_analyze))

    p = sub.add_parser("check-config", help="validate a configuration file (for ExecStartPre=)")
    add_config_args(p)
    p.set_defaults(func=guarded(cmd_check_config))


def _annotate_guard(inputs: list[str], cfg: config_mod.Config):  # noqa: ANN202
    """What ``analyze --annotate`` must never write into or onto: the folders of the inputs, the
    watched roots, the roots the database records (when it can be read), the input files
    themselves by ``(st_dev, st_ino)`` and the recorded evidence files (by inode)."""
    from daemon.queries.output import Guard

    roots = [os.path.realpath(os.path.dirname(os.path.abspath(os.fsencode(p)))) for p in inputs]
    roots += [os.path.realpath(os.fsencode(r.path)) for r in cfg.watch.roots if r.path]
    files: dict[tuple[int, int], str] = {}
    for p in inputs:
        try:
            st = os.stat(p)
        except OSError:
            continue  # reported as that file's failure below
        files[(st.st_dev, st.st_ino)] = to_db(p)
    return Guard(list(dict.fromkeys(roots)), None, files)


def _recorded_evidence(cfg: config_mod.Config):  # noqa: ANN202
    """(engine, connection, evidence roots) of the configured SQLite database when it exists and
    can be read, else (None, None, []): ``analyze`` works without a database, but uses a local one
    to refuse outputs in its recorded roots and onto its recorded files. A database server is not
    asked (an unreachable one could hold the command for minutes); a hard link to any file is
    refused anyway (see :mod:`daemon.queries.output`)."""
    from daemon.queries.media import evidence_roots
    from daemon.store.engine import open_engine

    engine = conn = None
    if not cfg.database.startswith("sqlite:"):
        return None, None, []
    try:
        engine = open_engine(cfg.database, readonly=True)
        conn = engine.connect()
        return engine, conn, evidence_roots(cfg, conn)
    except Exception as err:  # noqa: BLE001 - no file, no server, no tables: nothing recorded to protect
        log.debug("analyze: database %s not read (%s); outputs checked against the inputs and watched roots", cfg.database, err)
        if conn is not None:
            conn.close()
        if engine is not None:
            engine.dispose()
        return None, None, []


def _annotated_name(path: str, sha256: str) -> bytes:
    """The file name of an annotated copy: the input's stem (at most 160 bytes) + hash prefix."""
    stem = os.path.splitext(os.path.basename(os.fsencode(path)))[0][:160] or b"image"
    return stem + f".{sha256[:12]}.annotated.jpg".encode()


def cmd_analyze(args: argparse.Namespace) -> int:
    """An output refused (:class:`daemon.queries.output.OutputError`) is reported by :func:`guarded`."""
    from daemon.pipeline.analyze import load_pipeline
    from daemon.queries import output

    cfg = load_config(args, check_paths=False)
    inputs = list(args.images)
    guard, dfd, engine, conn = None, None, None, None
    try:
        if args.annotate:
            guard = _annotate_guard(inputs, cfg)
            engine, conn, recorded = _recorded_evidence(cfg)
            guard.roots, guard.conn = list(dict.fromkeys([*guard.roots, *recorded])), conn
            dfd = output.open_dir(args.annotate, guard, "--annotate")
        return _analyze(args, cfg, inputs, load_pipeline(cfg.pipeline), guard, dfd)
    finally:
        if dfd is not None:
            os.close(dfd)
        if conn is not None:
            conn.close()
        if engine is not None:
            engine.dispose()


def _analyze(args: argparse.Namespace, cfg: config_mod.Config, inputs: list[str], pipeline, guard, dfd: int | None) -> int:  # noqa: ANN001
    """The loop of ``analyze``: one document per input; annotated copies written beneath the
    checked output folder ``dfd`` (each file opened and checked as daemon.queries.output says)."""
    from daemon.pipeline import images, reading
    from daemon.queries import output
    from daemon.render import draw_faces, encode

    failed = 0
    for path in inputs:
        doc: dict = {"path": to_db(path), "sha256": None, "width": None, "height": None, "status": "ok", "faces": []}

        def hashed(fh: reading.FileHash, doc: dict = doc) -> bool:
            doc.update(sha256=fh.sha256, md5=fh.md5)
            return False

        res = None
        try:
            res = pipeline.analyze_path(path, known=hashed)
            doc.update(width=res.width, height=res.height, format=res.format, orientation=res.orientation,
                       frames=res.frames, notes=list(res.notes), faces=[f.to_json() for f in res.faces])
            if res.capture is not None:
                doc["capture"] = dataclasses.asdict(res.capture)
            if res.video is not None:
                v = res.video
                doc["video"] = {"codec": v.codec, "duration": v.duration, "fps": v.fps, "sampled": len(v.sampled),
                                "interval": v.interval, "cut": v.cut, "cut_detail": v.cut_detail}
        except images.ImageError as err:
            failed += 1
            doc.update(status="failed", reason=err.reason, error=err.message)
        if args.json:
            print(json.dumps(doc))
        else:
            _print_analysis(doc)
        if dfd is not None and res is not None and res.video is None:
            dec = images.decode(reading.read_file(path, max_bytes=cfg.pipeline.limits.max_file_bytes).data,
                                max_pixels=cfg.pipeline.limits.max_pixels)
            output.write_bytes(_annotated_name(path, doc["sha256"]), encode(draw_faces(dec.bgr, doc["faces"])), guard,
                               "--annotate", dir_fd=dfd)
        elif dfd is not None and res is not None:
            print(f"  (a video: draw a frame's faces with `forensic-gender annotate --image {doc['sha256'][:12]} --frame N`)")
    return 1 if failed else 0


def _print_analysis(doc: dict) -> None:
    if doc["status"] != "ok":
        print(f"{show(doc['path'])}: FAILED ({doc['reason']}): {show(doc['error'])}")
        return
    print(f"{show(doc['path'])}: {doc['width']}x{doc['height']} {doc.get('format')}, {len(doc['faces'])} face(s), sha256 {doc['sha256'][:16]}…")
    if doc.get("video"):
        v = doc["video"]
        cut = f", cut ({v['cut']}): {v['cut_detail']}" if v["cut"] else ""
        print(f"  video: {v['codec']}, {v['duration'] or 0:.1f} s, {v['sampled']} frames sampled every {v['interval']:g} s{cut}")
    for i, f in enumerate(doc["faces"]):
        x1, y1, x2, y2 = f["box"]
        at = f"frame {f['frame']} ({f['time']:.1f} s) " if f.get("frame") is not None else ""
        age = f"age {f['age']:.0f}±{f['age_std']:.0f}" if f.get("age") is not None else ""
        print(f"  face {i}: {at}box ({x1:.0f},{y1:.0f})-({x2:.0f},{y2:.0f}) {f['width_px']:.0f}px score {f['score']:.2f}  "
              f"{f['gender']:9s} p(male) {f['p_male']:.3f}  {age}")


def cmd_scan(args: argparse.Namespace) -> int:
    from daemon.scan import scan

    cfg = load_config(args)
    for p in args.paths:
        if not os.path.lexists(p):
            print(f"forensic-gender scan: {show(to_db(p))}: no such file or directory", file=sys.stderr)
            return 2
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        s = scan(args.paths, cfg, workers=args.workers, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    d = s.discovered
    g = s.genders
    for link, real in s.resolved:
        print(f"note: {show(to_db(link))} is a symbolic link; scanned the folder it points to, {show(to_db(real))}")
    print(f"files: {d.new} new, {d.changed + d.revived} changed, {d.unchanged} unchanged")
    print(f"this run: {s.analysed} analysed, {s.linked} already known (same content), {sum(s.failures.values())} failed")
    if s.failures:
        print("  failures: " + ", ".join(f"{k} {v}" for k, v in s.failures.most_common()))
    print(f"faces: {s.faces} (female {g['female']}, male {g['male']}, uncertain {g['uncertain']})")
    st = s.states
    print(f"in the database under these paths: {sum(st.values())} files: {st['done']} done, {st['failed']} failed,"
          f" {st['quarantined']} quarantined, {st['queued'] + st['working']} waiting")
    if s.reasons:
        print("  failures: " + ", ".join(f"{k} {v}" for k, v in s.reasons.most_common()))
    print(f"time: {s.seconds:.1f} s, {s.images_per_second:.2f} images/s; database {cfg.database}; model bundle {s.bundle_key}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    print(f"{args.config or '(defaults)'}: ok; database {cfg.database}; {len(cfg.watch.roots)} watched root(s)")
    return 0
