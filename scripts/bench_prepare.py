"""Files per second of `mie prepare` with 1 and 2 workers, on generated raw copies:

- cremad: 480×360 FLV at 30 fps + 16 kHz WAV, 2.5 s each, as in the release;
- kinetics_sounds: 340×256 MPEG-4 at 25 fps with 44.1 kHz stereo AAC, 10 s each, as Kinetics clips.

    python scripts/bench_prepare.py --dataset cremad [--clips 1000] [--workers 1,2]
"""
import argparse
import tempfile
import time
from pathlib import Path

from mie.data.cremad import EMOTIONS, prepare_cremad
from mie.data.kinetics_sounds import prepare_kinetics_sounds
from mie.data.synthetic.cremad import write_cremad
from mie.data.synthetic.kinetics_sounds import write_kinetics_sounds


def generate(dataset, root, clips):
    if dataset == "cremad":
        return write_cremad(root, [f"{1001 + i // 12}_S{i % 12:02d}_{EMOTIONS[i % 6]}_XX" for i in range(clips)])
    names = [f"class {c:02d}" for c in range(31)]
    clip = lambda i: (f"clip{i:05d}", names[i % 31])
    split = {"train": [clip(i) for i in range(clips) if i % 10], "test": [clip(i) for i in range(0, clips, 10)]}
    return write_kinetics_sounds(root, split, seconds=10.0, fps=25, size=(256, 340))


PREPARE = {"cremad": prepare_cremad, "kinetics_sounds": prepare_kinetics_sounds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(PREPARE), default="cremad")
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = generate(args.dataset, Path(tmp) / "raw", args.clips)
        print(f"generated {args.clips} {args.dataset} clips in {time.perf_counter() - t:.1f} s")
        for workers in (int(w) for w in args.workers.split(",")):
            t = time.perf_counter()
            summary = PREPARE[args.dataset](root, Path(tmp) / f"out{workers}", workers=workers, progress=False)
            seconds = time.perf_counter() - t
            print(f"{workers} worker(s): {summary.done} clips in {seconds:.1f} s = {summary.done / seconds:.1f} clips/s")


if __name__ == "__main__":
    main()
