"""How many claims and result writes per second the database sustains (no models).

    .venv/bin/python benchmarks/multihost_bench.py                       # SQLite + the local PostgreSQL
    .venv/bin/python benchmarks/multihost_bench.py --procs 1,2,4,8 --files 4000 --batch 16
    .venv/bin/python benchmarks/multihost_bench.py --pg postgresql+psycopg://postgres@db/fg --no-sqlite

For each database and each process count N: a fresh database (PostgreSQL: a fresh schema) gets
``--files`` queued file rows; N "host" processes (each its own ``Store`` with its own host id,
released together) loop ``claim(batch, lease)`` -> ``record_analysis`` per file (a synthetic
result with ``--faces`` faces: one images upsert, one analyses insert, the faces, the lease check
and the files update, one transaction per file, exactly what the service's writer does) until the
queue is empty. Reported: files/s over the whole run (= the most a farm of hosts could finish if
analysis were free), claim transactions/s and files claimed/s, result writes/s, and the mean
latency of one claim and of one write as seen by a host. Results go to
``benchmarks/out/multihost_bench.json``.

``--services 1,2,3`` measures instead real ``forensic-gender run`` processes (roles [analyze], one
worker each, own host ids, the real models) on ``--images`` generated 64x48 noise JPEGs queued in
a fresh PostgreSQL schema: files/s in the steady state (between 20 % and 80 % done).

On a shared 2-core machine the database server and the N clients compete for the same cores, so
the figures are a floor for a dedicated database server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402

from daemon.store.engine import open_store_engine  # noqa: E402
from daemon.store.writer import FileStat, Store  # noqa: E402

DEFAULT_PG = os.environ.get("FORENSIC_GENDER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _face(i: int) -> SimpleNamespace:
    return SimpleNamespace(box=(10.0 + i, 10.0, 40.0 + i, 50.0), score=0.9, landmarks=[(1.0, 2.0)] * 5, width_px=30.0,
                           p_male=0.7, p_female=0.3, gender="male", age=31.0, age_std=4.0)


def _result(path: str, faces: int) -> SimpleNamespace:
    sha = hashlib.sha256(path.encode()).hexdigest()
    return SimpleNamespace(path=path, size=12345, sha256=sha, md5=sha[:32], mtime_ns=1, format="JPEG", width=640,
                           height=480, orientation=1, frames=1, notes=(), faces=tuple(_face(i) for i in range(faces)),
                           seconds={"total": 0.1})


def worker(url: str, host: str, batch: int, faces: int, go: str, out: str) -> None:
    store = Store(open_store_engine(url), host)
    store.ensure_bundle("bench", {"bench": True})
    while not os.path.exists(go):
        time.sleep(0.002)
    t0 = time.time()
    claims = claim_tx = writes = 0
    t_claim = t_write = 0.0
    while True:
        a = time.perf_counter()
        got = store.claim(batch, 300.0)
        t_claim += time.perf_counter() - a
        claim_tx += 1
        if not got:
            break
        claims += len(got)
        for c in got:
            a = time.perf_counter()
            if store.record_analysis(c.id, _result(c.path, faces), "bench"):
                writes += 1
            t_write += time.perf_counter() - a
    t1 = time.time()
    store.engine.dispose()
    Path(out).write_text(json.dumps({"host": host, "start": t0, "end": t1, "claims": claims, "claim_tx": claim_tx,
                                     "writes": writes, "t_claim": t_claim, "t_write": t_write}))


def _fresh_pg(server: str) -> tuple[str, callable]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{name}"'))
    sep = "&" if "?" in server else "?"

    def drop() -> None:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()

    return f"{server}{sep}options=-csearch_path%3D{name}", drop


def run_one(url: str, procs: int, files: int, batch: int, faces: int, tmp: Path) -> dict:
    eng = open_store_engine(url)
    Store(eng, "seeder").upsert_files(
        FileStat(path=f"/share/case/{i:07d}.jpg", root="/share/case", size=12345, mtime_ns=1) for i in range(files))
    eng.dispose()
    go = tmp / f"go-{uuid.uuid4().hex[:6]}"
    outs, ps = [], []
    for i in range(procs):
        out = tmp / f"w{i}-{uuid.uuid4().hex[:6]}.json"
        outs.append(out)
        ps.append(subprocess.Popen([sys.executable, __file__, "_worker", url, f"host-{i}", str(batch), str(faces), str(go), str(out)]))
    time.sleep(1.0 + 0.3 * procs)  # imports and connections, then all start together
    go.touch()
    for p in ps:
        if p.wait(600) != 0:
            raise SystemExit(f"worker failed with {p.returncode}")
    rs = [json.loads(o.read_text()) for o in outs]
    wall = max(r["end"] for r in rs) - min(r["start"] for r in rs)
    claims, claim_tx, writes = (sum(r[k] for r in rs) for k in ("claims", "claim_tx", "writes"))
    assert writes == files, (writes, files)
    return {"procs": procs, "files": files, "batch": batch, "faces": faces, "wall_s": round(wall, 2),
            "files_per_s": round(writes / wall, 1), "claim_tx_per_s": round(claim_tx / wall, 1),
            "claims_per_s": round(claims / wall, 1), "writes_per_s": round(writes / wall, 1),
            "claim_ms": round(1000 * sum(r["t_claim"] for r in rs) / claim_tx, 2),
            "write_ms": round(1000 * sum(r["t_write"] for r in rs) / max(writes, 1), 2)}


def services_run(server: str, counts: list[int], images: int, workers: int, tmp: Path) -> list[dict]:
    import numpy as np
    from PIL import Image

    from daemon.discovery import walk  # noqa: F401 - only to fail early if the package is broken

    folder = tmp / "share"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"n{i:05d}.jpg", quality=70)
    fg = str(Path(sys.executable).with_name("forensic-gender"))
    rows = []
    for k in counts:
        url, drop = _fresh_pg(server)
        procs = []
        try:
            eng = open_store_engine(url)
            Store(eng, "seeder").upsert_files(
                FileStat(path=str(p), root=str(folder), size=p.stat().st_size, mtime_ns=p.stat().st_mtime_ns)
                for p in sorted(folder.iterdir()))
            for h in range(k):
                cfgf = tmp / f"svc{k}-{h}.yaml"
                cfgf.write_text(f"database: '{url}'\nservice: {{host_id: svc-{h}, roles: [analyze], workers: {workers}}}\n")
                procs.append(subprocess.Popen([fg, "run", "--config", str(cfgf)], stdout=subprocess.DEVNULL,
                                              stderr=open(tmp / f"svc{k}-{h}.log", "w")))
            marks: dict[int, float] = {}
            deadline = time.time() + 900
            while time.time() < deadline:
                with eng.connect() as c:
                    done = c.execute(text("select count(*) from files where state = 'done'")).scalar_one()
                for frac in (20, 80, 100):
                    if frac not in marks and done >= images * frac // 100:
                        marks[frac] = time.time()
                if 100 in marks:
                    break
                time.sleep(0.25)
            rate = (images * 60 // 100) / (marks[80] - marks[20])
            rows.append({"services": k, "workers_each": workers, "images": images, "files_per_s": round(rate, 1)})
            print(f"services={k}: {rate:.1f} files/s", file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(120)
            eng.dispose()
            drop()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        url, host, batch, faces, go, out = sys.argv[2:8]
        worker(url, host, int(batch), int(faces), go, out)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server URL (a fresh schema is used and dropped)")
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--faces", type=int, default=2)
    ap.add_argument("--services", default="", help="e.g. 1,2,3: time real services instead (PostgreSQL)")
    ap.add_argument("--images", type=int, default=900)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if args.services:
        with tempfile.TemporaryDirectory() as td:
            rows = services_run(args.pg, [int(x) for x in args.services.split(",")], args.images, args.workers, Path(td))
        out = REPO / "benchmarks" / "out" / "multihost_services.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"cpus": os.cpu_count(), "load": os.getloadavg(), "rows": rows}, indent=1))
        print("services | workers each | images | files/s (steady state, 20-80 % done)")
        for r in rows:
            print(f"{r['services']:>8} | {r['workers_each']:>12} | {r['images']:>6} | {r['files_per_s']:>6}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for dialect in ("sqlite", "postgresql"):
            if (dialect == "sqlite" and args.no_sqlite) or (dialect == "postgresql" and args.no_pg):
                continue
            for n in (int(x) for x in args.procs.split(",")):
                if dialect == "sqlite":
                    url, drop = f"sqlite:///{tmp / uuid.uuid4().hex}.db", (lambda: None)
                else:
                    url, drop = _fresh_pg(args.pg)
                try:
                    row = {"db": dialect, **run_one(url, n, args.files, args.batch, args.faces, tmp)}
                finally:
                    drop()
                rows.append(row)
                print(f"{row['db']:<10} procs={n}: {row['files_per_s']} files/s", file=sys.stderr, flush=True)
    out = REPO / "benchmarks" / "out" / "multihost_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "load_before": os.getloadavg(), "rows": rows}, indent=1))
    cols = ["db", "procs", "files", "wall_s", "claim_tx_per_s", "claims_per_s", "writes_per_s", "claim_ms", "write_ms"]
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>14}" for c in cols))
    print(f"(batch {args.batch}, {args.faces} faces per result, {os.cpu_count()} CPUs shared by server and clients; {out})")


if __name__ == "__main__":
    main()
