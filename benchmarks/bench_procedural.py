"""Procedural data throughput (samples/s per modality, one thread): the speed the removed test_fast_enough asserted.

    python benchmarks/bench_procedural.py [--samples 300]

Prints one JSON line per modality. The CPU demo needs well over 1,000 images/s so data never waits on the step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from worldmodel.data import ProceduralAudio, ProceduralImages, ProceduralVideos  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=300, help="samples drawn per modality")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for name, ds in (("image", ProceduralImages(size=32, length=10_000)), ("video", ProceduralVideos(length=10_000)),
                     ("audio", ProceduralAudio(length=10_000))):
        ds[0]  # warm-up
        start = time.perf_counter()
        for i in range(a.samples):
            ds[i]
        seconds = time.perf_counter() - start
        print(json.dumps({"modality": name, "samples": a.samples, "samples_per_s": round(a.samples / seconds, 1)}))


if __name__ == "__main__":
    main()
