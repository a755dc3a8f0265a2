"""Throughput of the RT-1 window reader (windows/s = steps/s: one window per step), per thread count.

    python benchmarks/bench_rt1_loader.py                       # on a generated RT-1-schema dataset
    python benchmarks/bench_rt1_loader.py --dir /data/fractal20220817_data/0.1.0 --windows 5000

Each window decodes about one JPEG frame (every frame of an episode is decoded once) plus gathers.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def measure(path: str, threads: int, windows: int, height: int, width: int, shuffle: int) -> tuple[float, int]:
    from worldmodel.data.rt1_reader import RT1Windows

    reader = RT1Windows(path, split="all", height=height, width=width, context_frames=2, future_frames=2,
                        horizon=4, shuffle_buffer=shuffle, num_parallel_calls=threads, threads=threads)
    it = iter(reader)
    next(it)  # pipeline start-up is not throughput
    start, n = time.perf_counter(), 0
    for _ in it:
        n += 1
        if n >= windows:
            break
    return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="RT-1 version directory; default: generate a synthetic one")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (tf.data parallel calls)")
    parser.add_argument("--windows", type=int, default=1500, help="windows timed per setting")
    parser.add_argument("--episodes", type=int, default=100, help="episodes of the generated dataset")
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--shuffle", type=int, default=500, help="window shuffle buffer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.dir
    if path is None:
        from worldmodel.data.rt1_synthetic import make_synthetic_episodes
        from worldmodel.data.rt1_writer import write_rt1_dataset

        tmp = tempfile.mkdtemp(prefix="bench_rt1_")
        t0 = time.perf_counter()
        episodes = make_synthetic_episodes(args.episodes, steps=24, seed=0)
        for ep in episodes:
            ep.pop("target_rc")
        path = str(write_rt1_dataset(episodes, tmp))
        steps = sum(len(ep["frames"]) for ep in episodes)
        print(f"generated {args.episodes} episodes / {steps} steps (256x320 JPEG) in {time.perf_counter() - t0:.1f} s"
              f" at {path}")
    for threads in [int(t) for t in args.threads.split(",")]:
        rate, n = measure(path, threads, args.windows, args.height, args.width, args.shuffle)
        print(f"threads={threads}: {rate:8.1f} windows/s (= steps/s) over {n} windows, "
              f"output {args.height}x{args.width}, 2 context + 2 future frames, horizon 4")


if __name__ == "__main__":
    main()
