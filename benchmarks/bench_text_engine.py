"""In-process text jobs through the engine: encode batching on against off, same run.

    python -m benchmarks.bench_text_engine [--device cpu|cuda] [--clients 1,16,64] [--quick]

The in-process side of ``benchmarks/bench_text.py`` (no HTTP, no database): the
``intents`` meta-model in two engines, one with the defaults (jobs of concurrent clients
batched: one encoder pass over every queued job's new texts, then one inner loop or
forward) and one with ``max_batch_size=1``. N clients in a closed loop (each submits its
next job when its last is done, ``bench_adapt.closed_loop``) run 10-intent, 5-example
adaptations of texts the engine has never seen, then the same adaptations again (every
text in the embedding cache), then predictions of one new sentence each. The engines
take turns repeat by repeat. Prints jobs per second, medians over repeats, and the
ratio; on CUDA the encoder runs in half precision (the engine's default) unless
``--float32``. Texts come from ``benchmarks.sentences``; jobs are built here as
``service.requests`` builds them, so it runs where only torch and the encoder are.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from benchmarks.bench_adapt import closed_loop, device_name
from benchmarks.bench_text import SHOTS, WAYS
from benchmarks.sentences import Sentences
from benchmarks.serving import load
from models.checkpoint import MetaModel
from models.evaluate import ARTIFACTS
from service import requests
from service.engine import (
    AdaptJob,
    Engine,
    EngineConfig,
    NotCached,
    PredictJob,
    configure_threads,
)
from service.settings import Settings

ROWS = ("adapt, new texts", "adapt, cached texts", "predict 1 new sentence")


def adapt_jobs(model: MetaModel, source: Sentences, count: int) -> list[AdaptJob]:
    """``count`` 10-intent, 5-example adaptations of new texts, validated by the service's
    own ``requests.adaptation`` (labels as class indices, their names as examples, the
    meta-model's steps and learned rates)."""
    settings = Settings()
    jobs = []
    for _ in range(count):
        texts, labels = source.support(source.choose(WAYS), SHOTS)
        valid = requests.adaptation(model=model, settings=settings, inputs=texts, targets=labels)
        jobs.append(valid.job)
    return jobs


def adapter(engine: Engine, jobs: list[AdaptJob]) -> Callable[[int], Future[Any]]:
    return lambda i: engine.submit_adapt(jobs[i])


def predictor(
    engine: Engine, model: MetaModel, blobs: list[bytes], queries: list[str]
) -> Callable[[int], Future[Any]]:
    """The i-th prediction: query i for client i mod len(blobs), as the prediction use
    case submits it (from the cache, else its stored params)."""

    def submit(i: int) -> Future[Any]:
        c = i % len(blobs)
        job = PredictJob(model.version, ("bench", str(c), "1"), (queries[i],))
        try:
            return engine.submit_predict(job)
        except NotCached as miss:
            return engine.submit_predict(miss.loaded(blobs[c]))

    return submit


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="cpu", help='"cpu", "cuda" or "auto"')
    p.add_argument("--threads", type=int, default=EngineConfig.threads)
    p.add_argument("--clients", default=None, help="default 1,16,64 (--quick: 1,8)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--quick", action="store_true", help="fewer jobs, clients and repeats")
    p.add_argument("--float32", action="store_true", help="no half-precision encoder on CUDA")
    args = p.parse_args()
    clients = [int(c) for c in (args.clients or ("1,8" if args.quick else "1,16,64")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    configure_threads(args.threads)  # the process's, as the service's lifespan does
    model = MetaModel.load(ARTIFACTS / "intents")
    modes = {"batched": EngineConfig.max_batch_size, "unbatched": 1}
    engines = {
        mode: Engine(
            {model.name: model},
            EngineConfig(
                device=args.device,
                max_batch_size=size,
                threads=args.threads,
                queue_size=4 * max(clients) + 64,
                encoder_half=not args.float32,
            ),
        )
        for mode, size in modes.items()
    }
    for engine in engines.values():
        engine.start()
    device = next(iter(engines.values())).device
    half = next(iter(engines.values())).texts.half
    source = Sentences(seed=0)
    print(
        f"fastadapt bench_text_engine: intents {model.version[:12]}, {WAYS}-intent "
        f"{SHOTS}-example adaptations, {model.config.inner.steps} inner steps; encoder in "
        f"{'float16' if half else 'float32'}\ndevice {device} ({device_name(device)}), "
        f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}; "
        f"median of {repeats} repeats (engines take turns); load average before: {load()}\n"
    )
    rates: dict[tuple[str, str, int], list[float]] = {}
    try:
        seeded = adapt_jobs(model, source, 8)  # the clients that predictions go to
        blobs = [f.result().params for f in map(engines["batched"].submit_adapt, seeded)]
        for n in clients:
            total = max(2 * n, 8) if args.quick else max(4 * n, 32)
            for _ in range(repeats):
                jobs = adapt_jobs(model, source, total)
                queries = source.queries(total)
                for mode, engine in engines.items():
                    adapt = adapter(engine, jobs)
                    rows = {  # the same adaptations twice: their texts cached the second time
                        ROWS[0]: adapt,
                        ROWS[1]: adapt,
                        ROWS[2]: predictor(engine, model, blobs, queries),
                    }
                    for row, submit in rows.items():
                        rates.setdefault((row, mode, n), []).append(closed_loop(submit, n, total))
    finally:
        for engine in engines.values():
            engine.stop()

    print("jobs/s, medians; at 1 client, 1000 / jobs/s is one job's latency in ms")
    print("| workload | clients | batched | unbatched | ratio |")
    print("|---|---:|---:|---:|---:|")
    for row in ROWS:
        for n in clients:
            b = rates[(row, "batched", n)]
            u = rates[(row, "unbatched", n)]
            ratio = statistics.median(x / y for x, y in zip(b, u, strict=True))
            print(
                f"| {row} | {n} | {statistics.median(b):,.1f} | {statistics.median(u):,.1f} "
                f"| {ratio:.2f}x |"
            )
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
