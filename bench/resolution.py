"""What decoding at reduced size costs: corrosion % error and decode time on real photos.

Each CorrosionDetector photo is classified at full size and decoded straight to 1/2, 1/4
and 1/8 of its long side (libjpeg's scaled IDCT via IMREAD_REDUCED_COLOR_*), and at the
640 px long side the agent can be configured to. The model is the AWS payload trained on
the AWS pixels (synthetic pixels when ../shared/data is absent).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from classify import training_pixels, warn

from agent import imageio
from agent.engine.detector import Detector
from export.convert import export_model
from export.train import AWS_PAYLOAD, train


def corrosion_pct(detector: Detector, data: bytes, name: str, long_side: int | None) -> float:
    decoded = imageio.decode(data, name, max_long_side=long_side)
    return detector.analyse(decoded.image, decoded.full_size).corrosion_pct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()
    photos = sorted((args.data / "corrosion-detector/rustnorust/train").glob("*/*.jpg"))
    if not photos:
        warn(f"no photos under {args.data}/corrosion-detector: nothing to measure")
        sys.exit(2)
    x, y, source = training_pixels(args.data)
    booster = train(x, y, AWS_PAYLOAD, threads=2).booster
    with tempfile.TemporaryDirectory() as tmp:
        detector = Detector.load(
            export_model(booster, Path(tmp), name="payload", version="1.0.0", parity=False)
        )
    print(f"{len(photos)} photos; model: AWS payload trained on {source}")
    rows = []
    for path in photos:
        data = path.read_bytes()
        info = imageio.probe(data, path.name)
        long = max(info.width, info.height)
        full = corrosion_pct(detector, data, path.name, None)
        row = {"long": long, "full": full}
        for label, side in (("1/2", -(-long // 2)), ("1/4", -(-long // 4)), ("1/8", -(-long // 8))):
            row[label] = corrosion_pct(detector, data, path.name, side)
        row["640"] = corrosion_pct(detector, data, path.name, 640) if long > 640 else full
        start = time.perf_counter()
        imageio.decode(data, path.name)
        row["ms_full"] = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        imageio.decode(data, path.name, max_long_side=-(-long // 4))
        row["ms_1/4"] = 1000 * (time.perf_counter() - start)
        rows.append(row)
    print(f"long side: median {np.median([r['long'] for r in rows]):.0f} px, "
          f"max {max(r['long'] for r in rows)} px")  # fmt: skip
    print("decode  |error| in percentage points vs full size: mean   p95    max")
    for label in ("1/2", "1/4", "1/8", "640"):
        err = np.abs(np.array([r[label] - r["full"] for r in rows]))
        print(f"  {label:>5s}                                      "
              f"{err.mean():6.2f} {np.percentile(err, 95):6.2f} {err.max():6.2f}")  # fmt: skip
    full_ms = np.median([r["ms_full"] for r in rows])
    quarter_ms = np.median([r["ms_1/4"] for r in rows])
    print(f"median decode: full {full_ms:.2f} ms, 1/4 {quarter_ms:.2f} ms")
    mean_err = {
        k: float(np.mean([abs(r[k] - r["full"]) for r in rows])) for k in ("1/2", "1/4", "1/8")
    }
    print(" ".join(f"err_pp_{k.replace('/', '_')}={v:.2f}" for k, v in mean_err.items()))


if __name__ == "__main__":
    main()
