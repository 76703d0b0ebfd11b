"""CPU time (process_time, 1 thread) of the whole analysis per image under each detector policy."""
import sys, time
from dataclasses import replace
from pathlib import Path
from daemon.config import PipelineConfig
from daemon.pipeline.analyze import load_pipeline
from daemon.evaluate import load_labelled, select

base = PipelineConfig()
def cfg(ms, tile, flip=False):
    return replace(base, detector=replace(base.detector, max_side=ms, tile_side=tile), gender=replace(base.gender, flip_tta=flip))
wider = [i.path for i in select(load_labelled("../shared/data/dev/wider").images, 12)]
x3 = [i.path for i in select(load_labelled("/tmp/wider_x3").images, 8)]
for label, c, paths in [("wider 640", cfg(640, None), wider), ("wider 1024", cfg(1024, None), wider), ("wider 1280", cfg(1280, None), wider),
                        ("wider 1280 flip", cfg(1280, None, True), wider),
                        ("x3 1280 no tile", cfg(1280, None), x3), ("x3 1280 tile 1280", cfg(1280, 1280), x3)]:
    p = load_pipeline(c)
    p.analyze_file(paths[0])  # warm-up
    det = cls = tot = 0.0
    faces = 0
    for path in paths:
        t0 = time.process_time()
        r = p.analyze_file(path)
        tot += time.process_time() - t0
        faces += len(r.faces)
    print(f"{label}: {1000 * tot / len(paths):.0f} ms CPU per image ({len(paths)} images, {faces} faces)", flush=True)
