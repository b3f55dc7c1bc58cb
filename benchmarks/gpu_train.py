"""GPU check of the plain training loop (no Ray: the GPU machine has PyTorch only); on a machine
without a GPU the same script gives the CPU numbers.

On one GPU: SASRec on a SASRec-format file with fp32 and with bf16 autocast (samples/s, seconds per
epoch), a longer bf16 run with the paper's protocol at the end (HR@10 / NDCG@10, sampled and full), and,
under ``torchrun --nproc_per_node N``, the same loop with N DDP processes sharing the GPU.

    PYTHONPATH=src python -m benchmarks.gpu_train --data games.txt --epochs 100 --out result.json
    PYTHONPATH=src torchrun --nproc_per_node 2 -m benchmarks.gpu_train --data games.txt --ddp --epochs 3

``--teacher A.best.pt --teacher B.best.pt`` distils those runs' models (same ``--model`` and ``--set``) into
the one trained here (:mod:`shopsight.training.next_item.distill`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from shopsight.training.models import build_model
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.evaluate import evaluate_next_item, scorer
from shopsight.training.next_item.fit import train_next_item
from shopsight.training.runtime.loop import LoopConfig


def _load(path: str, max_lines: int | None = None) -> LeaveOneOut:
    pairs = np.loadtxt(path, dtype=np.int64, max_rows=max_lines)
    return LeaveOneOut.split(SequenceData.from_pairs(pairs[:, 0], pairs[:, 1]))


def _model_config(pairs: list[str]) -> dict:
    """``key=value`` pairs (``--set loss=sampled_softmax``), values parsed as JSON where they parse."""
    config = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def _throughput(
    split, epochs: int, bf16: bool, device: str, batch_size: int, name: str, config: dict
) -> dict:
    torch.manual_seed(0)
    model = build_model(name, n_items=split.n_items, **config)
    cfg = LoopConfig(epochs=epochs, batch_size=batch_size, eval_every=10**6, bf16=bf16)
    started = time.perf_counter()
    history = train_next_item(model, split, cfg, device=device, log=lambda line: None)
    return {
        "bf16": bf16,
        "epochs": epochs,
        "samples_per_second": float(np.mean([h.samples_per_second for h in history[1:] or history])),
        "seconds_per_epoch": float(np.mean([h.seconds for h in history[1:] or history])),
        "wall_seconds": time.perf_counter() - started,
    }


def held_out_quality(model, split: LeaveOneOut, stage: str, device: str) -> dict[str, float]:
    """The paper's protocol on ``stage``, each user's history cut to the model's own ``max_len``, as the
    platform ranks (a shorter cut hides the long histories that a max_len of 200 was trained on)."""
    return evaluate_next_item(scorer(model.eval()), split, stage, model.cfg.max_len, device=device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ddp", action="store_true", help="run under torchrun: DDP throughput only")
    parser.add_argument("--out", default=None)
    parser.add_argument("--throughput-epochs", type=int, default=3)
    parser.add_argument("--max-lines", type=int, default=None, help="read only the first lines (smoke tests)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the quality run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--model", default="sasrec")
    parser.add_argument("--set", action="append", default=[], help="model config key=value (repeatable)")
    parser.add_argument("--patience", type=int, default=60)
    parser.add_argument(
        "--stage", default="test", choices=("valid", "test"),
        help="with --test-only: the held-out item to rank (valid: choose among runs on every user's validation item)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the training batches")
    parser.add_argument(
        "--teacher", action="append", default=[], help="a .best.pt to distil from (repeatable)"
    )
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--swa-start", type=int, default=0, help="average the weights from this epoch on")
    parser.add_argument(
        "--test-only",
        default=None,
        help="skip training: the test protocol on the weights of a --out .best.pt",
    )
    args = parser.parse_args()
    config = _model_config(args.set)
    split = _load(args.data, args.max_lines)
    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "users": len(split.train), "items": split.n_items}  # fmt: skip
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if args.ddp:
        # NCCL wants one GPU per rank; several ranks sharing one GPU go through gloo
        world = int(os.environ.get("WORLD_SIZE", "1"))
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
        torch.distributed.init_process_group(backend)
        result["backend"] = backend
        result["world_size"] = torch.distributed.get_world_size()
        result["ddp_bf16"] = _throughput(
            split, args.epochs, True, device, args.batch_size, args.model, config
        )
        if torch.distributed.get_rank() == 0:
            print(json.dumps(result))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=2)
        torch.distributed.destroy_process_group()
        return

    if not args.skip_throughput:
        result["fp32"] = _throughput(
            split, args.throughput_epochs, False, device, args.batch_size, args.model, config
        )
        result["bf16"] = _throughput(
            split, args.throughput_epochs, True, device, args.batch_size, args.model, config
        )
        print(json.dumps(result), flush=True)
    teachers = []  # built before seeding: their initialisation must not shift the student's random stream
    for path in args.teacher:
        teacher = build_model(args.model, n_items=split.n_items, **config)
        teacher.load_state_dict(torch.load(path, weights_only=True))
        teachers.append(teacher.to(device))
    torch.manual_seed(args.seed)
    model = build_model(args.model, n_items=split.n_items, **config)
    if args.test_only:
        model.load_state_dict(torch.load(args.test_only, weights_only=True))
        quality = held_out_quality(model, split, args.stage, device)
        print(
            json.dumps({"stage": args.stage, **{k: v for k, v in quality.items() if not k.startswith("_")}})
        )
        return
    best_path = f"{args.out}.best.pt" if args.out else None
    best_ndcg = [-1.0]

    def keep_best(result, model, optimizer, average) -> None:
        # hours-long CPU runs: the best weights so far survive an interrupted run (--test-only evaluates them)
        if best_path and result.valid and result.valid["ndcg@10"] > best_ndcg[0]:
            best_ndcg[0] = result.valid["ndcg@10"]
            weights = average.mean if average and average.count else model.state_dict()
            torch.save(weights, best_path)

    cfg = LoopConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_users=3000,
        patience=args.patience,
        seed=args.seed,
        distill_weight=args.distill_weight,
        swa_start=args.swa_start,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    history = train_next_item(model, split, cfg, device=device, on_epoch=keep_best, teachers=teachers)
    train_cpu_seconds = time.process_time() - cpu_started
    quality = held_out_quality(model, split, "test", device)
    result["quality_run"] = {
        "model": args.model,
        "model_config": asdict(model.cfg),
        "loop": asdict(cfg),
        "teachers": args.teacher,
        "epochs_run": len(history),
        "wall_seconds": time.perf_counter() - started,
        "train_cpu_seconds": train_cpu_seconds,
        "threads": torch.get_num_threads(),
        "test": {k: v for k, v in quality.items() if not k.startswith("_")},
        "valid_history": [{"epoch": h.epoch, **h.valid} for h in history if h.valid],
    }
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
