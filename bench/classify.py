"""Per-pixel classification of whole frames: xgboost vs onnxruntime vs our colour table.

Run as `make bench-classify` (`.venv/bin/python bench/classify.py --data ../shared/data`).
Frames are mosaics of real rust photos (DATA/corrosion-detector/rustnorust/train/rust) at
1920x1080 and 640x360; the model is the AWS solution's payload trained on
DATA/aws-rust-detection/train.csv. Without the data folder both fall back to synthetic data,
said on stderr. The last line is machine-readable.
"""

from __future__ import annotations

import os

# Compile times are single-core figures; must be set before numpy/xgboost load OpenMP/BLAS.
os.environ["OMP_NUM_THREADS"] = "1"

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SIZES = ((1920, 1080), (640, 360))
N_FRAMES = 4
RSS_FRAMES = 20
BIG: dict[str, Any] = {"objective": "binary:logistic", "num_round": 300, "max_depth": 8, "eta": 0.1}


def warn(msg: str) -> None:
    """Named after the script running (resolution.py borrows it)."""
    print(f"bench/{Path(sys.argv[0]).stem}: {msg}", file=sys.stderr, flush=True)


def mosaic(photos: list[np.ndarray], start: int, width: int, height: int) -> tuple[np.ndarray, int]:
    """Photos at native detail, each scaled to a third of the height, tiled row by row from
    `start`; also the index of the next photo, where a following mosaic may go on."""
    row_h = height // 3
    rows: list[np.ndarray] = []
    k = start
    for _ in range(3):
        parts: list[np.ndarray] = []
        filled = 0
        while filled < width:
            p = photos[k % len(photos)]
            k += 1
            w = max(1, round(p.shape[1] * row_h / p.shape[0]))
            parts.append(cv2.resize(p, (w, row_h), interpolation=cv2.INTER_AREA))
            filled += w
        rows.append(np.concatenate(parts, axis=1)[:, :width])
    frame = np.concatenate(rows, axis=0)
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA), k


def make_frames(data: Path) -> tuple[dict[tuple[int, int], list[np.ndarray]], str]:
    """N_FRAMES BGR frames per size: 1080p mosaics, 360p their INTER_AREA downscales."""
    paths = sorted((data / "corrosion-detector/rustnorust/train/rust").glob("*.jpg"))
    photos = [im for im in (cv2.imread(str(p)) for p in paths) if im is not None]
    big_w, big_h = SIZES[0]
    if photos:
        per = len(photos) // N_FRAMES or 1
        big = [mosaic(photos, i * per, big_w, big_h)[0] for i in range(N_FRAMES)]
        source = f"mosaics of {len(photos)} real rust photos"
    else:
        from export.synthetic import make_scene

        warn(f"no rust photos under {data}/corrosion-detector: using SYNTHETIC frames")
        rng = np.random.default_rng(0)
        big = [make_scene(rng, big_w, big_h).image for _ in range(N_FRAMES)]
        source = "synthetic scenes (export.synthetic.make_scene)"
    frames = {SIZES[0]: big}
    for w, h in SIZES[1:]:
        frames[(w, h)] = [cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in big]
    return frames, source


def training_pixels(data: Path) -> tuple[np.ndarray, np.ndarray, str]:
    csv = data / "aws-rust-detection/train.csv"
    if csv.is_file():
        from export.train import read_csv

        x, y = read_csv(csv)
        return x, y, f"{csv} ({len(y)} rows)"
    from export.datasets import sample_mask_pixels
    from export.synthetic import make_scene

    warn(f"{csv} not found: training on SYNTHETIC pixels")
    rng = np.random.default_rng(1)
    parts = [
        sample_mask_pixels(s.image, s.mask, 5000, rng) for s in (make_scene(rng) for _ in range(30))
    ]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return x, y, f"synthetic pixels ({len(y)} rows)"


def median_ms(fn: Callable[[np.ndarray], object], inputs: list[np.ndarray], reps: int) -> float:
    """Warm up once, then the median wall time of `reps` calls cycling over inputs, in ms."""
    fn(inputs[0])
    times = []
    for i in range(reps):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def best_s(fn: Callable[[], object], reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def rss_child(manifest: Path, frame_dir: Path) -> None:
    """Fresh process: what the agent loads and does, nothing else (no xgboost, no export)."""

    def peak_mb(field: str = "VmHWM") -> float:
        """/proc VmHWM, not ru_maxrss: a (v)forked child's ru_maxrss keeps the parent's peak
        across exec on Linux (measured: 464 MB before this process imported anything)."""
        status = Path("/proc/self/status")
        lines = status.read_text().splitlines() if status.exists() else []
        for ln in lines:
            if ln.startswith(f"{field}:"):
                return int(ln.split()[1]) / 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    from agent.memory import tune_malloc

    tune_malloc()  # as corrosion-agent does at start
    stages = {"numpy+cv2": peak_mb()}
    from agent.config import ClassifierConfig
    from agent.engine.classifier import ColourModel
    from agent.engine.detector import Detector

    stages["engine_imports"] = peak_mb()
    detector = Detector(ColourModel.load(manifest, threads=1), ClassifierConfig())
    stages["model_loaded"] = peak_mb()
    files = sorted(frame_dir.glob("frame*.npy"))
    for i in range(RSS_FRAMES):
        detector.analyse(np.load(files[i % len(files)]))
    stages["after_frames"] = peak_mb()
    stages["rss_now"] = peak_mb("VmRSS")
    # Anonymous memory only: VmHWM also counts library pages mapped from files, and how many
    # of those are resident follows the page cache (the same code and wheels measured
    # 132-170 MB across reinstalls); the heap, the table and the frames are anon.
    stages["anon_now"] = peak_mb("RssAnon")
    detector.close()
    print(json.dumps(stages))


def measure_rss(manifest: Path, frames: list[np.ndarray], tmp: Path) -> dict[str, float]:
    """Frames go to .npy files the child loads one at a time, as a device decodes them."""
    for i, f in enumerate(frames):
        np.save(tmp / f"frame{i}.npy", f)
    cmd = [sys.executable, __file__, "--rss-child", str(manifest), str(tmp)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def run(data: Path, reps: int, slow_reps: int) -> None:
    from agent.engine.classifier import TableClassifier, corroded_mask
    from agent.engine.model import PixelModel
    from agent.engine.table import compile_table, load_table
    from export.convert import export_model
    from export.train import AWS_PAYLOAD, train

    cv2.setNumThreads(1)
    if not data.is_dir():
        warn(f"data folder {data} is ABSENT: synthetic frames and synthetic training pixels")
    frames, frame_source = make_frames(data)
    x, y, train_source = training_pixels(data)
    t0 = time.perf_counter()
    small = train(x, y, AWS_PAYLOAD, threads=2, seed=0).booster
    big = train(x, y, BIG, threads=2, seed=0).booster
    print(f"frames: {frame_source}; model trained on {train_source}")
    print(f"training both models (2 threads): {time.perf_counter() - t0:.1f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp_name:
        tmp = Path(tmp_name)
        # The small model ships its table (with_table=True): the RSS child loads it like a device.
        ver = "0.0.0-bench"
        small_manifest = export_model(small, tmp / "s", name="aws", version=ver, parity=False)
        big_manifest = export_model(
            big, tmp / "b", name="big", version=ver, parity=False, with_table=False
        )
        small_model = PixelModel.load(small_manifest)
        table = load_table(small_model)

        small.set_param({"nthread": 1})
        feed_name = small_model.session.get_inputs()[0].name
        ones = TableClassifier(table, threads=1)
        ncpu = os.cpu_count() or 1
        many = TableClassifier(table, threads=ncpu)
        methods: dict[str, tuple[Callable[[np.ndarray], object], bool]] = {  # (fn, on float RGB)
            "xgb": (small.inplace_predict, True),
            "ort": (lambda x: small_model.session.run(None, {feed_name: x}), True),
            "one": (lambda f: corroded_mask(ones.scores(f)), False),
            "many": (lambda f: corroded_mask(many.scores(f)), False),
        }
        rows: dict[str, list[float]] = {k: [] for k in methods}
        agree: list[float] = []
        for size in SIZES:
            bgr = frames[size]
            rgb = [np.ascontiguousarray(f[..., ::-1].reshape(-1, 3), dtype=np.float32) for f in bgr]
            print(f"timing {size[0]}x{size[1]} ...", file=sys.stderr, flush=True)
            for key, (fn, slow) in methods.items():
                rows[key].append(median_ms(fn, rgb if slow else bgr, slow_reps if slow else reps))
            ref = np.asarray(small.inplace_predict(rgb[0])).reshape(size[1], size[0]) > 0.5
            agree.append(100.0 * float(np.mean((corroded_mask(ones.scores(bgr[0])) > 0) == ref)))
        ones.close()
        many.close()

        big_model = PixelModel.load(big_manifest)
        compile_small = best_s(lambda: compile_table(small_model))
        compile_big = best_s(lambda: compile_table(big_model))
        print("measuring peak RSS in a fresh process ...", file=sys.stderr, flush=True)
        rss = measure_rss(small_manifest, frames[SIZES[0]], tmp)

    labels = {
        "xgb": "xgboost inplace_predict, nthread=1",
        "ort": "onnxruntime, 1 intra-op thread",
        "one": "table lookup + mask, 1 thread",
        "many": f"table lookup + mask, {ncpu} threads",
    }
    head = "".join(f"{f'{w}x{h}':>12}" for w, h in SIZES)
    print(f"\nms per frame (median; warm-up excluded){'':<2}{head}")
    for key, label in labels.items():
        print(f"  {label:<39}" + "".join(f"{v:12.2f}" for v in rows[key]))
    print(f"  ({slow_reps} reps for xgboost/onnxruntime, {reps} for the table; xgboost and")
    print("   onnxruntime are timed on the predict call only, float32 RGB [N,3] prepared)")
    print("  table labels == xgboost labels on frame 0: " + ", ".join(f"{a:.4f} %" for a in agree))
    print("\ncompile_table, best of 3, 1 core (OMP_NUM_THREADS=1; numpy is single-threaded):")
    print(f"  small (AWS payload, 100 trees depth 3): {compile_small:8.3f} s")
    print(f"  big (300 trees depth 8, eta 0.1)      : {compile_big:8.3f} s")
    print(f"\npeak RSS (VmHWM) of a fresh process, ColourModel.load + {RSS_FRAMES} 1080p frames")
    print("through Detector.analyse, after each stage (rss_now: current RSS at the end,")
    print("anon_now: its anonymous part, which the page cache does not sway):")
    print("  " + ", ".join(f"{k}={v:.1f} MB" for k, v in rss.items()))
    speed_xgb = rows["xgb"][0] / rows["one"][0]
    speed_ort = rows["ort"][0] / rows["one"][0]
    print(
        f"speedup_vs_xgboost={speed_xgb:.1f} speedup_vs_ort={speed_ort:.1f} "
        f"ms_1080p={rows['one'][0]:.2f} compile_s_small={compile_small:.3f} "
        f"compile_s_big={compile_big:.3f} rss_mb={rss['after_frames']:.1f} "
        f"anon_mb={rss['anon_now']:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--reps", type=int, default=50, help="timed reps for the table")
    parser.add_argument("--slow-reps", type=int, default=3, help="timed reps, xgboost and ort")
    parser.add_argument(
        "--rss-child", nargs=2, metavar=("MANIFEST", "FRAMES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), Path(args.rss_child[1]))
    else:
        run(args.data, max(1, args.reps), max(1, args.slow_reps))


if __name__ == "__main__":
    main()
