"""Image adaptation cost: an Omniglot artifact through the engine against a per-request
``MetaModel.adapt``, same run.

    python -m benchmarks.bench_images [--artifact models/artifacts/omniglot] [--device cpu]

N-way K-shot support sets of 28x28 images (random pixels: the cost does not depend on
them) adapted head-only as the artifact says, N clients in a closed loop through the
engine (validated once beforehand, as ``service.requests`` does; micro-batcher, device
worker, safetensors out); the baseline adapts
one request at a time with ``MetaModel.adapt`` and serialises the result the same way.
Prints adaptations per second and the latency of one adaptation alone (medians).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_adapt import closed_loop, device_name, serial_rate
from models.checkpoint import MetaModel
from models.params import to_bytes
from service import requests
from service.engine import AdaptJob, Engine, EngineConfig, configure_threads
from service.settings import Settings

ARTIFACT = Path(__file__).resolve().parent.parent / "models" / "artifacts" / "omniglot"
PROTOCOLS = ((20, 1), (20, 5), (5, 1))  # (way, shot)


def support_sets(meta: MetaModel, count: int, way: int, shot: int, pixels: int) -> list[AdaptJob]:
    """Validated jobs (the meta-model's inner-loop defaults) of ``count`` random sets."""
    g = torch.Generator().manual_seed(0)
    labels = [c for c in range(way) for _ in range(shot)]  # (N*K,)
    images = [torch.rand(way * shot, pixels, generator=g).tolist() for _ in range(count)]
    settings = Settings()
    return [
        requests.adaptation(
            model=meta,
            settings=settings,
            inputs=x,
            targets=labels,
        ).job
        for x in images
    ]


def loop_adapt(base: MetaModel, job: AdaptJob, shape: tuple[int, ...]) -> bytes:
    """The baseline: one request, lists to tensors, ``MetaModel.adapt``, safetensors."""
    device = next(iter(base.params.values())).device
    x = torch.tensor(job.inputs, device=device).reshape(-1, *shape)  # (N*K, 1, 28, 28)
    y = torch.tensor(job.targets, device=device).long()  # (N*K,)
    return to_bytes(base.adapt(x, y).fast)


def rates(
    engine: Engine,
    base: MetaModel,
    jobs: list[AdaptJob],
    shape: tuple[int, ...],
    n: int,
    repeats: int,
) -> tuple[float, float, float]:
    """Median engine and baseline adaptations/s, and the median of their ratios."""
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(closed_loop(lambda i: engine.submit_adapt(jobs[i % len(jobs)]), n, 4 * n + 28))
        theirs.append(serial_rate(lambda i: loop_adapt(base, jobs[i], shape), 16))
    ratio = statistics.median(x / y for x, y in zip(ours, theirs, strict=True))
    return statistics.median(ours), statistics.median(theirs), ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default=str(ARTIFACT))
    p.add_argument("--device", default="cpu", help='"cpu", "cuda" or "auto"')
    p.add_argument("--threads", type=int, default=EngineConfig.threads)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    configure_threads(args.threads)  # the process's, as the service's lifespan does
    meta = MetaModel.load(args.artifact)
    config = EngineConfig(device=args.device, threads=args.threads, queue_size=4 * max(clients))
    engine = Engine({meta.name: meta}, config)
    engine.start()
    gc.collect()
    base = MetaModel.load(args.artifact).to(engine.device)  # the baseline's own copy
    shape = tuple(meta.config.task["input_shape"])  # (1, 28, 28)
    pixels = int(torch.tensor(shape).prod())
    arch = meta.config.architecture
    print(
        f"fastadapt bench_images: {args.artifact} ({arch['kind']}, {arch.get('channels')} "
        f"channels, adapt={meta.config.inner.adapt}, {meta.config.inner.steps} steps)\n"
        f"device {engine.device} ({device_name(engine.device)}), torch {torch.__version__}, "
        f"intra-op threads {torch.get_num_threads()}; median of {args.repeats} repeats\n"
    )
    print(f"{'way':>4} {'shot':>5} {'clients':>8} {'engine/s':>9} {'loop/s':>8} {'ratio':>6}")
    try:
        for way, shot in PROTOCOLS:
            jobs = support_sets(meta, 64, way, shot, pixels)
            for n in clients:
                a, b, ratio = rates(engine, base, jobs, shape, n, args.repeats)
                print(f"{way:>4} {shot:>5} {n:>8} {a:>9.1f} {b:>8.1f} {ratio:>5.1f}x")
            alone = []
            for i in range(5):
                start = time.perf_counter()
                engine.submit_adapt(jobs[i]).result()
                alone.append(1000 * (time.perf_counter() - start))
            print(f"{'':>4} {'':>5} one adaptation alone: {statistics.median(alone):.1f} ms")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
