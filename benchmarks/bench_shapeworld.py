"""How many ShapeWorld images per second one CPU core generates (scene sampling + rendering).

    python benchmarks/bench_shapeworld.py [--n 20000] [--sizes 32 224]

Target (foundation issue): at least 5,000 images/s at 32 px on one core.
Text annotations (captions, questions) are computed lazily and are timed separately.
"""

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from course_lib.data import ShapeWorld, WorldConfig  # noqa: E402


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="images per measurement at 32 px")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    args = parser.parse_args()
    world = ShapeWorld(WorldConfig())
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, 1 core")
    print(f"{'image size':>10} {'images/s':>10} {'scenes/s':>10} {'render/s':>10}")
    for size in args.sizes:
        n = args.n if size <= 64 else max(args.n // 20, 200)
        offset = [0]

        def scenes_only():
            offset[0] += n
            return world.scenes(range(offset[0], offset[0] + n))

        t_scene = best_of(scenes_only)
        scenes = world.scenes(range(n))
        t_render = best_of(lambda: world.render_batch(scenes, size))
        total = t_scene + t_render
        print(f"{size:>10} {n / total:>10.0f} {n / t_scene:>10.0f} {n / t_render:>10.0f}")
    m = 2000
    scenes = world.scenes(range(10**6, 10**6 + m))
    t0 = time.perf_counter()
    for s in scenes:
        s.captions, s.questions, s.region_phrases  # noqa: B018
    print(f"text annotations (captions + questions + phrases): {m / (time.perf_counter() - t0):.0f} scenes/s")
    print("reproduce: python benchmarks/bench_shapeworld.py")


if __name__ == "__main__":
    main()
