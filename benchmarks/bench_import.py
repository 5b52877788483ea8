"""Throughput and memory of `prefalign data import --format pickapic` on synthetic Pick-a-Pic shards.

Writes N pairs (two fresh small JPEGs each, so every image is new to the store: the worst case for
image work; 10% ties) as several Pick-a-Pic v2-shaped parquet shards in a temporary folder, imports
them with the real command in a subprocess, and prints JSON with pairs/sec and the import process's
peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which only sees that one child).

    OMP_NUM_THREADS=1 python benchmarks/bench_import.py --pairs 20000 --json reports/bench_import.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from prefalign.runtime import emit_json

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_SHARD = 5000
ROW_GROUP_ROWS = 256  # Hugging Face writes image datasets in small row groups too
TIE_EVERY = 10


def synthetic_jpeg(index: int, side: int) -> bytes:
    """A small JPEG unique to ``index``.

    The index is written in base 4 into the colours of a 4x4 grid of blocks (levels 0, 85, 170, 255),
    steps far larger than JPEG's quantisation, so two indices never encode to the same bytes.
    """
    digits = [(index >> (2 * k)) & 3 for k in range(48)]
    grid = (np.array(digits, dtype=np.uint8) * 85).reshape(4, 4, 3)
    block = max(1, side // 4)
    pixels = np.kron(grid, np.ones((block, block, 1), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=90, subsampling=0)
    return buffer.getvalue()


def shard_table(first_pair: int, n_pairs: int, side: int) -> pa.Table:
    """Pick-a-Pic v2 columns for pairs ``first_pair .. first_pair + n_pairs - 1``."""
    start = datetime(2023, 4, 1)
    rows = []
    for pair in range(first_pair, first_pair + n_pairs):
        tie = pair % TIE_EVERY == 0
        label_0 = 0.5 if tie else float(pair % 2)
        rows.append(
            {
                "are_different": True,
                "best_image_uid": None if tie else f"img-{2 * pair + (1 - int(label_0))}",
                "caption": f"synthetic prompt {pair // 3}: a {('red', 'green', 'blue')[pair % 3]} thing",
                "created_at": start + timedelta(seconds=pair),
                "has_label": True,
                "image_0_uid": f"img-{2 * pair}",
                "image_0_url": "",
                "image_1_uid": f"img-{2 * pair + 1}",
                "image_1_url": "",
                "jpg_0": synthetic_jpeg(2 * pair, side),
                "jpg_1": synthetic_jpeg(2 * pair + 1, side),
                "label_0": label_0,
                "label_1": 1.0 - label_0,
                "model_0": "model-a",
                "model_1": "model-b",
                "ranking_id": pair,
                "user_id": 1000 + pair % 97,
                "num_example_per_prompt": 1,
            }
        )
    return pa.Table.from_pylist(rows)


def write_dataset(folder: Path, n_pairs: int, side: int) -> int:
    """Write the shards; returns their total size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard, first in enumerate(range(0, n_pairs, ROWS_PER_SHARD)):
        path = folder / f"train-{shard:05d}.parquet"
        pq.write_table(
            shard_table(first, min(ROWS_PER_SHARD, n_pairs - first), side), path, row_group_size=ROW_GROUP_ROWS
        )
        total += path.stat().st_size
    return total


def run_import(shards: Path, output: Path, params: Path) -> tuple[dict, float]:
    """Run the import command in a child process; its JSON summary and wall seconds."""
    command = [
        sys.executable,
        "-m",
        "prefalign.cli",
        "data",
        "import",
        "--format",
        "pickapic",
        "--input",
        str(shards),
        "--output",
        str(output),
        "--params",
        str(params),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("PREFALIGN_ANNOTATOR_KEY", "benchmark-key")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"import failed with exit code {done.returncode}:\n{done.stderr[-2000:]}")
    # The command prints one readable line, then the JSON summary.
    return json.loads(done.stdout.split("\n", 1)[1]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000, help="Pairs to generate and import.")
    parser.add_argument("--json", type=Path, help="Also write the result JSON here.")
    parser.add_argument("--image-side", type=int, default=32, help="Side of the synthetic JPEGs in pixels.")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="The params.yaml to import with.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder (printed).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    workdir = Path(tempfile.mkdtemp(prefix="bench_import_"))
    try:
        started = time.perf_counter()
        input_bytes = write_dataset(workdir / "shards", args.pairs, args.image_side)
        log.info(
            "wrote %d pairs in %d shard(s), %.1f MB, in %.1f s",
            args.pairs,
            math.ceil(args.pairs / ROWS_PER_SHARD),
            input_bytes / 1e6,
            time.perf_counter() - started,
        )
        summary, seconds = run_import(workdir / "shards", workdir / "out", args.params)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        result = {
            "pairs": args.pairs,
            "shards": math.ceil(args.pairs / ROWS_PER_SHARD),
            "image_side": args.image_side,
            "input_mb": round(input_bytes / 1e6, 1),
            "imported_pairs": summary["imported"]["pairs"],
            "quarantined": summary["quarantined"],
            "wall_seconds": round(seconds, 2),
            "import_seconds": summary["seconds"],
            "pairs_per_sec": round(summary["imported"]["pairs"] / seconds, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        }
    finally:
        if args.keep:
            log.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
