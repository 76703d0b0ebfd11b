"""The ``near`` command: near-copies of a photo or of a recorded image (resized, recompressed or
slightly cropped versions of one picture), by their perceptual hash (:mod:`daemon.pipeline.phash`)."""

from __future__ import annotations

import argparse
from typing import Any

from daemon.cli.errors import CliError, guarded
from daemon.paths import show


def _photo_hash(photo: str, cfg: Any) -> tuple[str, str]:
    """The hash of a query photo, decoded as the worker decodes it (nothing recorded), and its SHA-256."""
    from daemon.pipeline import images, reading
    from daemon.pipeline.phash import near_hash

    p = cfg.pipeline
    d = p.detector
    hint = d.max_side * 2 if d.tile_side else d.max_side  # as Pipeline.decode_hint: the same pixels give the same hash
    fb = reading.read_file(photo, max_bytes=p.limits.max_file_bytes)
    dec = images.decode(fb.data, max_pixels=p.limits.max_pixels, min_side_hint=hint)
    return near_hash(dec.bgr), fb.sha256


def cmd_near(args: argparse.Namespace) -> int:
    from daemon.pipeline.images import ImageError
    from daemon.pipeline.phash import parse
    from daemon.store import nearcopies as nc
    from daemon.store.engine import open_engine

    if (args.photo is None) == (args.image is None):
        raise CliError("give a PHOTO or --image SHA256 (one of them)")
    try:
        k = nc.check_distance(args.distance) if args.distance is not None else nc.DEFAULT_DISTANCE
        limit = int(args.limit)
        if limit < 1:
            raise ValueError
    except nc.NearError as err:
        raise CliError(str(err)) from None
    except ValueError:
        raise CliError(f"--limit must be a positive whole number, got {args.limit!r}") from None
    from daemon.cliargs import load_config

    cfg = load_config(args)
    exclude = None
    if args.photo is not None:
        try:
            h, sha = _photo_hash(args.photo, cfg)
        except ImageError as err:
            raise CliError(str(err)) from None
        label = args.photo
    engine = open_engine(cfg.database, readonly=True)
    try:
        with engine.connect() as conn:
            if args.image is not None:
                try:
                    exclude, sha, stored = nc.image_by_sha(conn, args.image)
                except nc.NearError as err:
                    raise CliError(str(err)) from None
                if stored is None:
                    raise CliError(
                        f"image {sha[:16]} has no near-copy hash (it failed to decode, or was analysed before this version); "
                        "search by its file instead: forensic-gender near PATH"
                    )
                h, label = stored, f"image {sha[:16]}"
            index = nc.load_index(conn)
            found = index.search(parse(h), k, exclude=exclude)
            matches = nc.describe(conn, found[:limit])
    finally:
        engine.dispose()
    rows: list[dict[str, Any]] = [
        {
            "sha256": m.sha256,
            "distance": m.distance,
            "same_content": m.sha256 == sha,
            "format": m.format,
            "width": m.width,
            "height": m.height,
            "paths": m.paths,
            "frame": m.frame,
        }
        for m in matches
    ]
    if args.format == "json":
        from daemon.queries.output import json_text

        doc = {
            "query": label,
            "sha256": sha,
            "near_hash": h,
            "distance": k,
            "images_searched": index.images,
            "hashes_searched": len(index.ids),
            "images_without_hash": index.unhashed,
            "found": len(found),
            "matches": rows,
        }
        print(json_text(doc, indent=1))
        return 0
    more = f" (the nearest {limit} shown; raise --limit)" if len(found) > limit else ""
    print(f"{len(found)} image(s) within {k} of 192 bits of {show(label)} among {index.images} hashed images and videos, nearest first{more}")
    if index.unhashed:
        print(f"note: {index.unhashed} recorded image(s) have no hash (failed, or analysed before near-copy hashing) and were not searched")
    if rows:
        print(f"{'distance':>8}  {'sha256':<16}  {'size':>11}  path")
        for r in rows:
            size = f"{r['width']}x{r['height']}" if r["width"] else "?"
            paths = r["paths"] or ["(no current path)"]
            tag = "  (same content)" if r["same_content"] else ""
            tag += f"  (video frame {r['frame']})" if r["frame"] is not None else ""
            for p in paths:
                print(f"{r['distance']:>8}  {r['sha256'][:16]:<16}  {size:>11}  {show(p)}{tag}")
    return 0


def register_cli(sub: Any) -> None:
    from daemon.cliargs import add_config_args
    from daemon.store.nearcopies import DEFAULT_DISTANCE, MAX_DISTANCE

    p = sub.add_parser(
        "near",
        help="near-copies (resized, recompressed, slightly cropped) of a photo or a recorded image",
        description="List the recorded images whose perceptual hash lies within --distance bits of the query's, nearest first.",
    )
    p.add_argument("photo", nargs="?", metavar="PHOTO", help="a photo file (hashed here, not recorded)")
    p.add_argument("--image", metavar="SHA256", help="a recorded image by its SHA-256 or a prefix of it (6+ hex digits)")
    p.add_argument(
        "--distance",
        metavar="K",
        help=f"most differing bits of 192 (0 to {MAX_DISTANCE}; default {DEFAULT_DISTANCE}, where benchmarks/near_bench.py finds "
        "98%% of the copies at 99%% precision)",
    )
    p.add_argument("--limit", default="200", metavar="N", help="show at most N images (default 200)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    add_config_args(p)
    p.set_defaults(func=guarded(cmd_near))
