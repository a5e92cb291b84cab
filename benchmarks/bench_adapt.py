"""In-process adaptation throughput: the batched engine against a per-request loop, same run.

    python -m benchmarks.bench_adapt [--quick] [--device cpu|cuda|auto] [--threads 1]

Sinusoid, 10-shot support sets, 10 inner steps at lr 0.01. N concurrent clients each
keep one adaptation outstanding (a closed loop: a client submits its next job when the
last one is done) through the engine's real path (jobs validated once beforehand, as
``service.requests`` does): the bounded queue, the micro-batcher, the device worker, the
bmm kernel, safetensors bytes out. The baseline serves the same requests one at a time
with a plain autograd loop (learn2learn's clone/adapt: no nn.Module,
``torch.autograd.grad`` per step), from the same lists to the same bytes and losses. It
is serial, so its rate does not depend on N; it is measured in every repeat,
interleaved with the engine. Prints medians over repeats and the ratio, and the engine's
share of its bmm kernel alone (all N clients' support sets in one call, no queue, no
futures, no bytes), measured in the same repeats. Then predictions (10 query points per
request, params cached): N clients submitting one prediction at a time (an idle engine
runs each at once in the caller's thread), and N clients per ``submit_predict_many``
call (what a bulk endpoint does: one gathered forward over their stacked params),
each against a plain per-request forward loop.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import queue
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.serving import load
from benchmarks.support_sets import Support, supports
from models.checkpoint import ArtifactConfig, MetaModel
from models.kernels import BatchedLearner
from models.maml import InnerLoopConfig
from models.nets import MLP
from models.params import Params, from_bytes, to_bytes
from service.engine import AdaptJob, Engine, EngineConfig, NotCached, PredictJob
from service.engine.runner import ModelRunner

SHOTS, STEPS, LR, QUERIES = 10, 10, 0.01, 10
ORDER = ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias")
HEADER = f"{'clients':>8} {'engine':>10} {'per-request':>12} {'ratio':>8} {'mean batch':>11}"
ARTIFACT = Path(__file__).resolve().parent.parent / "models" / "artifacts" / "sinusoid"


def meta_model(random_init: bool) -> tuple[MetaModel, str]:
    """The shipped sinusoid artifact when present, else a random 1-40-40-1 MLP."""
    if (ARTIFACT / "config.json").exists() and not random_init:
        return MetaModel.load(ARTIFACT), "models/artifacts/sinusoid"
    torch.manual_seed(0)
    architecture = {"kind": "mlp", "in_features": 1, "hidden": [40, 40], "out_features": 1}
    inner = InnerLoopConfig(steps=STEPS, lr=LR)
    config = ArtifactConfig(
        "sinusoid", "sinusoid", architecture, {"kind": "regression", "input_shape": [1]}, inner
    )
    net = MLP()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    return MetaModel(config, params, {}, "random"), "random 1-40-40-1 MLP"


# -- the baseline: one request at a time, plain autograd ------------------------------------
def forward(p: list[Tensor], x: Tensor) -> Tensor:
    # x: (K, 1) -> (K, 1), the 1-40-40-1 ReLU MLP written out
    h = F.relu(F.linear(x, p[0], p[1]))
    h = F.relu(F.linear(h, p[2], p[3]))
    return F.linear(h, p[4], p[5])


def loop_adapt(
    meta: Params, support: Support, clip: float | None, device: torch.device
) -> tuple[bytes, float, float]:
    """learn2learn-style clone/adapt of one client: lists in, safetensors bytes out. With
    the meta-model's inner gradient clip when it has one, as the engine applies it."""
    x = torch.tensor(support[0], device=device)  # (K, 1)
    y = torch.tensor(support[1], device=device)[:, None]  # (K, 1)
    fast = [meta[n].detach().requires_grad_() for n in ORDER]  # clone()
    before = None
    for _ in range(STEPS):  # adapt()
        loss = F.mse_loss(forward(fast, x), y)
        grads = torch.autograd.grad(loss, fast)
        before = float(loss.detach()) if before is None else before
        if clip is not None:  # as torch.nn.utils.clip_grad_norm_
            norm = torch.stack([(g * g).sum() for g in grads]).sum().sqrt()
            grads = tuple(g * torch.clamp(clip / (norm + 1e-12), max=1.0) for g in grads)
        fast = [p - LR * g for p, g in zip(fast, grads, strict=True)]
    with torch.no_grad():
        after = float(F.mse_loss(forward(fast, x), y))
    return to_bytes(dict(zip(ORDER, fast, strict=True))), before or after, after


def loop_predict(params: list[Tensor], rows: list[list[float]], device: torch.device) -> Any:
    with torch.no_grad():
        return forward(params, torch.tensor(rows, device=device)).tolist()


def serial_rate(run: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        run(i)
    return count / (time.perf_counter() - start)


# -- the engine: N clients in a closed loop ---------------------------------------------------
def closed_loop(submit: Callable[[int], Future[Any]], clients: int, total: int) -> float:
    """``clients`` outstanding jobs until ``total`` are done; jobs per second.

    This thread plays the clients (as request threads would): each completion hands the
    future back here, and the client submits its next job, so submission and result
    handling run beside the device worker, not on it."""
    finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    submitted = 0
    start = time.perf_counter()
    for _ in range(min(clients, total)):
        submit(submitted).add_done_callback(finished.put)
        submitted += 1
    for _ in range(total):
        finished.get().result()  # raises if the job failed
        if submitted < total:
            submit(submitted).add_done_callback(finished.put)
            submitted += 1
    return total / (time.perf_counter() - start)


# -- the benchmark ------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and repeats")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:1" or "auto"')
    parser.add_argument("--threads", type=int, default=EngineConfig.threads)
    parser.add_argument("--clients", default="1,16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --quick)")
    parser.add_argument("--max-batch-size", type=int, default=EngineConfig.max_batch_size)
    parser.add_argument("--max-batch-delay-ms", type=float, default=EngineConfig.max_batch_delay_ms)
    parser.add_argument("--no-predict", action="store_true", help="skip the prediction rows")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel-only rows")
    parser.add_argument(
        "--random-init", action="store_true", help="a random MLP even if the artifact exists"
    )
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    clients = [int(c) for c in args.clients.split(",")]

    meta, source = meta_model(args.random_init)
    config = EngineConfig(
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        queue_size=max(clients) * 2,
        threads=args.threads,
    )
    engine = Engine({"sinusoid": meta}, config)
    engine.start()  # sets the process's torch threads, so the baseline runs with the same
    gc.collect()  # as the service's lifespan does after start-up
    gc.freeze()
    device = engine.device
    base = {n: t.to(device) for n, t in meta.params.items()}  # the baseline's meta-params
    pool = supports(max(4 * max(clients), 2048))  # one support set per job of a run
    jobs = [AdaptJob(meta.version, x, y, STEPS, LR) for x, y in pool]
    kernel = engine.runners[meta.version].batched.path
    print(
        f"fastadapt bench_adapt: sinusoid {SHOTS}-shot, {STEPS} inner steps at lr {LR}; "
        f"meta-model {source} (inner gradient clip {meta.config.inner.grad_clip})\n"
        f"device {device} ({device_name(device)}), torch {torch.__version__}, "
        f"intra-op threads {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}\n"
        f"engine: kernel {kernel}, max_batch_size {config.max_batch_size}, "
        f"max_batch_delay_ms {config.max_batch_delay_ms}; median of {repeats} repeats; "
        f"load average before: {load()}\n"
    )
    try:
        adapt_rows(engine, clients, pool, jobs, repeats, args.quick, base)
        if not args.no_predict:
            predict_rows(engine, clients, pool, repeats, args.quick, device)
        if not args.no_kernels:
            kernel_rows(engine, clients, pool, repeats)
    finally:
        engine.stop()
    print(f"\nload average after: {load()}")


def only_runner(engine: Engine) -> ModelRunner:
    """The engine's one meta-model (the sinusoid), keyed by its version."""
    return next(iter(engine.runners.values()))


def adapt_rows(
    engine: Engine,
    clients: list[int],
    pool: list[Support],
    jobs: list[AdaptJob],
    repeats: int,
    quick: bool,
    base: Params,
) -> None:
    clip = only_runner(engine).inner.grad_clip  # both sides clip when it has one
    bmm = only_runner(engine).batched
    print("adaptations/s (kernel: the bmm kernel alone, N clients per call, no engine)")
    print(f"{HEADER} {'kernel':>10} {'of kernel':>10}")
    base_count = 48 if quick else 128
    for n in clients:
        total = max(2 * n, 512) if quick else max(4 * n, 2048)
        ours, theirs, sizes, alone = [], [], [], []
        x, y, w = kernel_inputs(pool, min(n, engine.config.max_batch_size), engine.device)
        for _ in range(repeats):
            before = engine.stats().worker.adapt_batches
            ours.append(closed_loop(lambda i: engine.submit_adapt(jobs[i]), n, total))
            sizes.append(total / max(1, engine.stats().worker.adapt_batches - before))
            theirs.append(
                serial_rate(lambda i: loop_adapt(base, pool[i], clip, engine.device), base_count)
            )
            calls = max(1, total // len(x) // 4)
            start = time.perf_counter()
            for _ in range(calls):
                bmm.adapt(x, y, w, steps=STEPS, lr=LR)
            alone.append(calls * len(x) / (time.perf_counter() - start))
        row(n, ours, theirs, sizes, alone)


def kernel_inputs(pool: list[Support], n: int, device: torch.device) -> tuple[Tensor, ...]:
    """N support sets as the kernel takes them: x (N, K, 1), y (N, K, 1), w (N, K)."""
    x = torch.tensor([s[0] for s in pool[:n]], device=device)  # (N, K, 1)
    y = torch.tensor([s[1] for s in pool[:n]], device=device)[..., None]  # (N, K, 1)
    return x, y, torch.ones(n, SHOTS, device=device)


def kernel_rows(engine: Engine, clients: list[int], pool: list[Support], repeats: int) -> None:
    """The batched kernels alone, all N clients in one call: bmm against torch.func vmap."""
    bmm = only_runner(engine).batched
    vmap = BatchedLearner(bmm.learner, bmm.params, bmm.lrs, path="vmap")
    print("\nkernels alone, adaptations/s (N clients in one call, no engine)")
    print(f"{'clients':>8} {'bmm':>10} {'vmap':>12} {'ratio':>8}")
    for n in clients:
        x = torch.tensor([s[0] for s in pool[:n]], device=engine.device)  # (N, K, 1)
        y = torch.tensor([s[1] for s in pool[:n]], device=engine.device)[..., None]  # (N, K, 1)
        w = torch.ones(n, SHOTS, device=engine.device)
        calls = max(1, 256 // n)
        rates: dict[str, list[float]] = {"bmm": [], "vmap": []}
        for _ in range(repeats):
            for name, kernel in (("bmm", bmm), ("vmap", vmap)):
                start = time.perf_counter()
                for _ in range(calls):
                    kernel.adapt(x, y, w, steps=STEPS, lr=LR)
                rates[name].append(calls * n / (time.perf_counter() - start))
        a, b = statistics.median(rates["bmm"]), statistics.median(rates["vmap"])
        print(f"{n:>8} {a:>10,.0f} {b:>12,.0f} {a / b:>7.1f}x")


def predict_rows(
    engine: Engine,
    clients: list[int],
    pool: list[Support],
    repeats: int,
    quick: bool,
    device: torch.device,
) -> None:
    """Predictions of N cached clients, 10 query points each, against a serial loop."""
    count = max(clients)
    adapting = [
        engine.submit_adapt(AdaptJob(only_runner(engine).version, *pool[i], 1, LR))
        for i in range(count)
    ]
    blobs = [f.result().params for f in adapting]
    queries = [[q / 2.0 - 2.5] for q in range(QUERIES)]  # (Q, 1)
    fast = [from_bytes(blob) for blob in blobs[:256]]
    ordered = [[p[n].to(device) for n in ORDER] for p in fast]

    def submit(i: int) -> Future[Any]:
        c = i % count
        job = PredictJob(only_runner(engine).version, ("bench", str(c), "1"), queries)
        try:
            return engine.submit_predict(job)
        except NotCached as miss:  # the first time: as the prediction use case does
            return engine.submit_predict(miss.loaded(blobs[c]))

    closed_loop(submit, count, count)  # every client's params into the cache
    version = only_runner(engine).version

    def many(n: int, total: int) -> float:
        """N clients' predictions per ``submit_predict_many`` call (a bulk caller), until
        ``total`` are answered; predictions per second."""
        start = time.perf_counter()
        for _ in range(max(1, total // n)):
            jobs = [PredictJob(version, ("bench", str(c), "1"), queries) for c in range(n)]
            for future in engine.submit_predict_many(jobs):
                future.result()
        return max(1, total // n) * n / (time.perf_counter() - start)

    print(f"\npredictions/s ({QUERIES} query points per request, params cached)")
    print(
        "engine: N clients in a closed loop of single submits; many: N clients per "
        "submit_predict_many call"
    )
    print(f"{HEADER} {'many':>10} {'ratio':>8}")
    base_count = 512 if quick else 2048
    for n in clients:
        total = max(2 * n, 1024) if quick else max(4 * n, 4096)
        ours, theirs, sizes, bulk = [], [], [], []
        for _ in range(repeats):
            before = engine.stats().worker.predict_batches
            ours.append(closed_loop(submit, n, total))
            sizes.append(total / max(1, engine.stats().worker.predict_batches - before))
            theirs.append(
                serial_rate(
                    lambda i: loop_predict(ordered[i % len(ordered)], queries, device), base_count
                )
            )
            bulk.append(many(n, total))
        row(n, ours, theirs, sizes, bulk, share=False)


def row(
    clients: int,
    ours: list[float],
    theirs: list[float],
    sizes: list[float],
    alone: list[float] | None = None,
    share: bool = True,
) -> None:
    """Medians; the ratio is the median of each repeat's ratio (engine and loop measured
    back to back), which the load of a shared machine disturbs least; so is the last
    column: the engine's share of the kernel alone (``share``), or the bulk rate's ratio
    to the loop."""
    a, b = statistics.median(ours), statistics.median(theirs)
    ratio = statistics.median(x / y for x, y in zip(ours, theirs, strict=True))
    line = f"{clients:>8} {a:>10,.0f} {b:>12,.0f} {ratio:>7.1f}x {statistics.median(sizes):>11.1f}"
    if alone is not None and share:
        of = statistics.median(x / y for x, y in zip(ours, alone, strict=True))
        line += f" {statistics.median(alone):>10,.0f} {of:>9.0%}"
    elif alone is not None:
        times = statistics.median(x / y for x, y in zip(alone, theirs, strict=True))
        line += f" {statistics.median(alone):>10,.0f} {times:>7.1f}x"
    print(line)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()


if __name__ == "__main__":
    main()
