"""The identity commands: ``similar``, ``persons``, ``recluster`` and ``evaluate-identity``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from daemon.cli.errors import CliError, guarded
from daemon.paths import show


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}") from None
    if not 1 <= n <= 2**62:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return n


def _reviewer(args: argparse.Namespace) -> str | None:
    return getattr(args, "reviewer", None) or os.environ.get("USER")


# -- similar --------------------------------------------------------------------------------------


def cmd_similar(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from daemon.cliargs import load_config
    from daemon.queries.similar import FaceIndex, default_cache, face_descriptor
    from daemon.store import persons as ps
    from daemon.store import schema as s
    from daemon.store.engine import open_engine

    if (args.photo is None) == (args.face_id is None):
        raise CliError("give a PHOTO or --face-id ID (one of them)")
    cfg = load_config(args)
    vector, label = None, ""
    if args.photo is not None:
        vector, label = _photo_descriptor(args.photo, cfg, args.face)
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            if vector is None:
                vector, label = face_descriptor(conn, args.face_id), f"face {args.face_id}"
            index = FaceIndex(None if args.no_cache else default_cache(cfg.database))
            index.refresh(conn)
            matches = index.search(vector, limit=args.limit, max_distance=args.max_distance, exclude=args.face_id)
            f, a, i, fl = s.faces, s.analyses, s.images, s.files
            info: dict[int, Any] = {}
            if matches:
                cols = [
                    f.c.id,
                    f.c.idx,
                    f.c.x1,
                    f.c.y1,
                    f.c.x2,
                    f.c.y2,
                    f.c.gender,
                    i.c.sha256,
                    select(fl.c.path).where(fl.c.image_id == i.c.id, fl.c.state != "gone").order_by(fl.c.id).limit(1).scalar_subquery().label("path"),
                ]
                frm = f.join(a, a.c.id == f.c.analysis_id).join(i, i.c.id == a.c.image_id)
                if ps.has_persons(conn):
                    p = ps.persons
                    cols += [ps.face_persons.c.person_id, p.c.name]
                    frm = frm.outerjoin(ps.face_persons, ps.face_persons.c.face_id == f.c.id).outerjoin(p, p.c.id == ps.face_persons.c.person_id)
                ids = [m.face_id for m in matches]
                for k in range(0, len(ids), 500):
                    for r in conn.execute(select(*cols).select_from(frm).where(f.c.id.in_(ids[k : k + 500]))):
                        info[r.id] = r
    finally:
        engine.dispose()
    out = []
    for m in matches:
        r = info[m.face_id]
        m_ = r._mapping
        out.append(
            {
                "face_id": m.face_id,
                "distance": round(m.distance, 4),
                "person_id": m_.get("person_id"),
                "person_name": m_.get("name"),
                "gender": r.gender,
                "sha256": r.sha256,
                "face_idx": r.idx,
                "box": [round(r.x1, 1), round(r.y1, 1), round(r.x2, 1), round(r.y2, 1)],
                "path": r.path,
            }
        )
    if args.format == "json":
        from daemon.queries.output import json_text

        print(json_text({"query": label, "faces_searched": len(index.ids), "matches": out}, indent=1))
        return 0
    print(f"{len(out)} face(s) within {args.max_distance} of {show(label)} among {len(index.ids)} current faces, nearest first")
    if out:
        print(f"{'face':>8} {'distance':>8} {'person':>8}  {'gender':<9} path")
        for o in out:
            who = "" if o["person_id"] is None else str(o["person_id"]) + (f" {o['person_name']}" if o["person_name"] else "")
            print(f"{o['face_id']:>8} {o['distance']:>8.4f} {show(who):>8}  {o['gender']:<9} {show(o['path'] or '(no current path)')}")
    return 0


def _photo_descriptor(photo: str, cfg: Any, choice: int | None) -> tuple[Any, str]:
    """The descriptor of the face to search for in a query photo (analysed, not recorded)."""
    import numpy as np

    from daemon.pipeline.analyze import load_pipeline

    pipe = load_pipeline(cfg.pipeline)
    res = pipe.analyze_file(photo)
    faces = res.faces
    if not faces:
        raise CliError(f"no face found in {photo}; try a larger or sharper photo, or search by a stored face with --face-id", 1)
    if choice is None and len(faces) > 1:
        listing = "; ".join(f"--face {k}: box {[round(v) for v in fc.box]} width {fc.width_px:.0f} px" for k, fc in enumerate(faces))
        raise CliError(f"{len(faces)} faces found in {photo}; choose one with --face N ({listing})")
    k = choice or 0
    if not 0 <= k < len(faces):
        raise CliError(f"--face {k}: {photo} has faces 0 to {len(faces) - 1}")
    blob = faces[k].descriptor
    if blob is None:
        raise CliError("the face backbone is disabled in this configuration (pipeline.backbone.enabled: false); enable it to search by face")
    return np.frombuffer(blob, "<f2").astype(np.float32), f"face {k} of {photo}"


# -- persons --------------------------------------------------------------------------------------


def cmd_recluster(args: argparse.Namespace) -> int:
    from daemon.cliargs import load_config
    from daemon.store.engine import open_store_engine
    from daemon.store.persons import recluster

    cfg = load_config(args)
    engine = open_store_engine(cfg.database)
    try:
        st = recluster(engine, cfg.identity)
    finally:
        engine.dispose()
    print(
        f"recluster: {st['faces']} current faces with descriptors, {st['placed']} placed into {st['persons']} persons "
        f"({st['pinned']} pinned by an examiner), {st['removed_persons']} empty persons removed, {st['seconds']} s"
    )
    return 0


def cmd_persons(args: argparse.Namespace) -> int:
    from daemon.cliargs import load_config
    from daemon.store import persons as ps
    from daemon.store.engine import open_engine, open_store_engine

    cfg = load_config(args)
    action = args.action
    if action == "list":
        engine = open_engine(cfg.database, readonly=True)
        try:
            with engine.connect() as conn:
                rows = _person_list(conn, args.min_faces, args.limit)
        finally:
            engine.dispose()
        if args.format == "json":
            print(json.dumps(rows, indent=1, ensure_ascii=True))
            return 0
        print(f"{'person':>8} {'faces':>6} {'images':>6}  name")
        for r in rows:
            print(f"{r['person_id']:>8} {r['faces']:>6} {r['images']:>6}  {show(r['name'] or '')}")
        return 0
    engine = open_store_engine(cfg.database)
    try:
        who = _reviewer(args)
        if action == "name":
            ps.rename(engine, args.person, args.name, reviewer=who)
            print(f"person {args.person} named {show(args.name)!r}" if args.name.strip() else f"person {args.person}: name cleared")
        elif action == "merge":
            n = ps.merge(engine, args.keep, args.other, reviewer=who)
            print(f"person {args.other} merged into person {args.keep}: {n} face(s) pinned to {args.keep}")
        elif action == "split":
            p = ps.assign(engine, args.face, args.to, reviewer=who)
            print(f"face {args.face} now belongs to person {p} (pinned)")
        elif action == "release":
            ps.release(engine, args.face, reviewer=who)
            print(f"face {args.face} belongs to no person (pinned)")
    finally:
        engine.dispose()
    return 0


def _person_list(conn: Any, min_faces: int, limit: int) -> list[dict[str, Any]]:
    from sqlalchemy import func, select

    from daemon.store import persons as ps
    from daemon.store import schema as s

    if not ps.has_persons(conn):
        return []
    cur = ps.current_faces().subquery()
    fp, f, a = ps.face_persons, s.faces, s.analyses
    q = (
        select(fp.c.person_id, ps.persons.c.name, func.count().label("faces"), func.count(func.distinct(a.c.image_id)).label("images"))
        .select_from(
            fp.join(cur, cur.c.id == fp.c.face_id)
            .join(f, f.c.id == fp.c.face_id)
            .join(a, a.c.id == f.c.analysis_id)
            .join(ps.persons, ps.persons.c.id == fp.c.person_id)
        )
        .group_by(fp.c.person_id, ps.persons.c.name)
        .having(func.count() >= min_faces)
        .order_by(func.count().desc(), fp.c.person_id)
        .limit(limit)
    )
    return [{"person_id": r.person_id, "name": r.name, "faces": r.faces, "images": r.images} for r in conn.execute(q)]


def cmd_evaluate_identity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.cliargs import load_config
    from daemon.identity_eval import evaluate, format_report

    cfg = load_config(args)
    rep = evaluate(Path(args.folder), cfg, min_images=args.min_images, workers=args.workers)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep, indent=1) if args.format == "json" else format_report(rep))
    return 0


def register_cli(sub: Any) -> None:
    from daemon.cliargs import add_config_args
    from daemon.queries.similar import DEFAULT_DISTANCE

    p = sub.add_parser("similar", help="faces in the database like the face in a photo or a stored face, nearest first (read-only)")
    p.add_argument("photo", nargs="?", metavar="PHOTO", help="a photo with the face to search for (analysed, not recorded)")
    p.add_argument("--face", type=int, metavar="N", help="which face of PHOTO when it has several (0 = first)")
    p.add_argument("--face-id", type=_positive, metavar="ID", help="search for a stored face instead of a photo")
    p.add_argument("--limit", type=_positive, default=20, help="at most this many faces (default 20)")
    p.add_argument(
        "--max-distance", type=float, default=DEFAULT_DISTANCE, help=f"only faces closer than this (default {DEFAULT_DISTANCE}, dlib's same-person threshold)"
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="read every descriptor from the database (by default they are kept in $XDG_CACHE_HOME/forensic-gender between runs)",
    )
    add_config_args(p)
    p.set_defaults(func=guarded(cmd_similar))

    p = sub.add_parser("recluster", help="rebuild the persons of all current faces from scratch (keeps the examiner's decisions)")
    add_config_args(p)
    p.set_defaults(func=guarded(cmd_recluster))

    p = sub.add_parser("persons", help="list persons; name, merge and split them (decisions are audited and survive recluster)")
    add_config_args(p)
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    q = acts.add_parser("list", help="persons with their face and image counts, largest first (the default)")
    q.add_argument("--min-faces", type=_positive, default=2, help="only persons with at least this many faces (default 2)")
    q.add_argument("--limit", type=_positive, default=100)
    q.add_argument("--format", choices=("table", "json"), default="table")
    q = acts.add_parser("name", help="name a person (an empty name clears it)")
    q.add_argument("person", type=_positive)
    q.add_argument("name")
    q = acts.add_parser("merge", help="merge person OTHER into person KEEP")
    q.add_argument("keep", type=_positive)
    q.add_argument("other", type=_positive)
    q = acts.add_parser("split", help="move a face to another person (--to) or split it off into a new one")
    q.add_argument("face", type=_positive, metavar="FACE_ID")
    q.add_argument("--to", type=_positive, metavar="PERSON")
    q = acts.add_parser("release", help="take a face out of every person")
    q.add_argument("face", type=_positive, metavar="FACE_ID")
    for name, q in acts.choices.items():
        if name != "list":
            q.add_argument("--reviewer", help="who decided (default: $USER)")
        # also after the action; SUPPRESS keeps a value given before it
        q.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="YAML configuration (see config.example.yaml)")
        q.add_argument("--db", metavar="URL", default=argparse.SUPPRESS, help="database URL (overrides the configuration)")
    p.set_defaults(func=guarded(cmd_persons), action="list", min_faces=2, limit=100, format="table")

    p = sub.add_parser("evaluate-identity", help="verification and clustering accuracy on identity-labelled faces (e.g. dev lfw)")
    p.add_argument("folder", metavar="DIR", help="a folder with images/ and labels.csv (columns file, person)")
    p.add_argument("--min-images", type=_positive, default=2, help="only people with at least this many images (default 2)")
    p.add_argument("--workers", type=int, default=0, help="analysis processes (default: one per core)")
    p.add_argument("--out", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_config_args(p, db=False)
    p.set_defaults(func=guarded(cmd_evaluate_identity))
