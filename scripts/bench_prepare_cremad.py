"""Files per second of `mie prepare cremad` with 1 and 2 workers, on generated CREMA-D-style clips
(480×360 FLV at 30 fps and 16 kHz WAV, 2.5 s each, as in the release).

    python scripts/bench_prepare_cremad.py [--clips 1000] [--workers 1,2]
"""
import argparse
import tempfile
import time
from pathlib import Path

from mie.data.cremad import EMOTIONS, prepare_cremad
from mie.data.synthetic.cremad import write_cremad


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"{1001 + i // 12}_S{i % 12:02d}_{EMOTIONS[i % 6]}_XX" for i in range(args.clips)]
        t = time.perf_counter()
        root = write_cremad(Path(tmp) / "raw", names)
        print(f"generated {args.clips} clips in {time.perf_counter() - t:.1f} s")
        for workers in (int(w) for w in args.workers.split(",")):
            t = time.perf_counter()
            summary = prepare_cremad(root, Path(tmp) / f"out{workers}", workers=workers, progress=False)
            seconds = time.perf_counter() - t
            print(f"{workers} worker(s): {summary.done} clips in {seconds:.1f} s = {summary.done / seconds:.1f} clips/s")


if __name__ == "__main__":
    main()
