"""Meta-test an Omniglot artifact on its held-out alphabets, exactly as the service serves it.

Each task: N held-out characters, K support and Q query drawings per character; the
artifact's ``MetaModel.adapt`` fits the support set, ``MetaModel.predict`` scores the
queries, and the prediction is the arg-max over the task's N labels. Prints mean
accuracy with a 95% confidence interval (1.96 standard errors over tasks).

    python -m models.evaluate_omniglot --artifact models/artifacts/omniglot \\
        --data ../shared/data/omniglot [--way 20 --shot 1 --tasks 600 --seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter

import torch
from torch import Tensor

from models.checkpoint import MetaModel
from models.tasks import omniglot

DEFAULT_PROTOCOLS = ((5, 1), (5, 5), (20, 1), (20, 5))


def accuracies(
    model: MetaModel,
    split: omniglot.Split,
    way: int,
    shot: int,
    tasks: int,
    queries: int,
    seed: int,
) -> Tensor:
    """Per-task query accuracies (tasks,) through ``MetaModel.adapt`` + ``predict``."""
    return meta_test(model, split, way, shot, tasks, queries, seed)[0]


def meta_test(
    model: MetaModel,
    split: omniglot.Split,
    way: int,
    shot: int,
    tasks: int,
    queries: int,
    seed: int,
) -> tuple[Tensor, Counter[tuple[str, str]]]:
    """Per-task query accuracies (tasks,) and the errors by (true, predicted) character."""
    g = torch.Generator().manual_seed(seed)
    device = str(next(iter(model.params.values())).device)
    accs = []
    errors: Counter[tuple[str, str]] = Counter()
    for _ in range(tasks):
        ep = omniglot.sample(g, split, 1, way, shot, queries)
        assert ep.classes is not None  # omniglot.sample records each label's class
        classes = ep.classes[0].tolist()  # (N,)
        ep = ep.to(device)
        fast = model.adapt(ep.xs[0], ep.ys[0]).fast  # support (N*K, 1, 28, 28), labels (N*K,)
        logits = model.predict(fast, ep.xq[0])[:, :way]  # (N*Q, N): the task's own labels
        predicted = logits.argmax(-1)
        accs.append((predicted == ep.yq[0]).float().mean())
        wrong = (predicted != ep.yq[0]).nonzero().flatten().tolist()
        for t, p in zip(ep.yq[0][wrong].tolist(), predicted[wrong].tolist(), strict=True):
            errors[split.names[classes[t]], split.names[classes[p]]] += 1
    return torch.stack(accs).cpu(), errors


def confusion_table(errors: Counter[tuple[str, str]], queries: int, top: int) -> str:
    """The ``top`` (true, predicted) character pairs by errors, as a markdown table."""
    total = sum(errors.values())
    lines = [
        f"{total} errors in {queries} queries; the {top} most frequent confusions:",
        "| true | predicted | errors | share of errors |",
        "|---|---|---:|---:|",
    ]
    for (true, predicted), n in errors.most_common(top):
        lines.append(f"| {true} | {predicted} | {n} | {100 * n / max(total, 1):.1f}% |")
    return "\n".join(lines)


def mean_ci(accs: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval."""
    n = accs.numel()
    std = float(accs.std(unbiased=True)) if n > 1 else 0.0
    return float(accs.mean()), 1.96 * std / math.sqrt(max(n, 1))


def held_out_split(model: MetaModel, data: omniglot.Omniglot) -> omniglot.Split:
    held = tuple(model.config.task["split"]["held_out_alphabets"])
    return omniglot.split(data, held)[1]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fastadapt eval omniglot", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", default="models/artifacts/omniglot")
    p.add_argument("--data", default="../shared/data/omniglot")
    p.add_argument("--way", type=int, choices=range(2, omniglot.MAX_WAY + 1), metavar="N")
    p.add_argument("--shot", type=int, choices=range(1, omniglot.MAX_SHOT + 1), metavar="K")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--queries", type=int, default=10, help="query drawings per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--confusions",
        type=int,
        default=0,
        metavar="TOP",
        help="after the table, each row's TOP character pairs the model confuses most",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    model = MetaModel.load(args.artifact).to(device)
    data = omniglot.load(args.data)
    split = held_out_split(model, data)
    protocols: tuple[tuple[int, int], ...] = DEFAULT_PROTOCOLS
    if args.way is not None or args.shot is not None:
        ways = (args.way,) if args.way else (5, 20)
        shots = (args.shot,) if args.shot else (1, 5)
        protocols = tuple((w, k) for w in ways for k in shots)
    inner = model.config.inner
    held = ", ".join(model.config.task["split"]["held_out_alphabets"])
    print(
        f"Omniglot meta-test: artifact {args.artifact} (sha256 {model.version[:12]}), "
        f"held-out alphabets {held} ({split.classes} characters)\n"
        f"adaptation: adapt={inner.adapt} steps={inner.steps} learned_lr={inner.learned_lr} "
        f"support_shifts={model.config.task.get('support_shifts')}; "
        f"{args.tasks} tasks per row, {args.queries} queries per class, seed {args.seed}\n"
    )
    print("| way | shot | accuracy | 95% CI | s/task |")
    print("|----:|-----:|---------:|-------:|-------:|")
    confused: list[tuple[int, int, Counter[tuple[str, str]]]] = []
    for way, shot in protocols:
        t0 = time.perf_counter()
        accs, errors = meta_test(model, split, way, shot, args.tasks, args.queries, args.seed)
        per_task = (time.perf_counter() - t0) / args.tasks
        mean, ci = mean_ci(accs)
        print(f"| {way} | {shot} | {100 * mean:.2f}% | ± {100 * ci:.2f}% | {per_task:.3f} |")
        confused.append((way, shot, errors))
        sys.stdout.flush()
    for way, shot, errors in confused if args.confusions > 0 else []:
        queries = args.tasks * way * args.queries
        print(f"\n{way}-way {shot}-shot: " + confusion_table(errors, queries, args.confusions))


if __name__ == "__main__":
    main(sys.argv[1:])
