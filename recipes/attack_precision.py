"""``python -m recipes.attack_precision``: the TRADES training attack under bf16 autocast against fp32.

A one-off measurement behind BENCHMARKS.md ("bf16 and the training attack") and tests/test_attacks_precision.py:
each model is clean-trained briefly, then the paper's training attack (MNIST eps 0.3 PGD-20 x 0.01, CIFAR-10
eps 0.031 PGD-10 x 0.007) runs from the same TRADES start in fp32, in plain bf16, and in bf16 with its first
one or two steps in fp32. The final KL(p || q) and the accuracy on the attack's x' are measured with the fp32
model. Writes ``<out>/bench_attack-precision.{json,md}``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from fastrobust.bench import sample_batch
from fastrobust.config import TrainConfig
from fastrobust.distributed import resolve_device
from fastrobust.models import create_model
from fastrobust.report import atomic_write_text, device_description, markdown_table, write_json
from fastrobust.step import TrainStep

PROG = "python -m recipes.attack_precision"


def run_attack_precision(models: Sequence[str], device: str = "auto", batch: int = 256,
                         train_steps: int = 150, data_dir: str | None = None, seed: int = 0) -> list[dict]:
    """The TRADES training attack under bf16 autocast against fp32, on briefly trained models: the final
    KL(p || q) (p, q from the fp32 model) and the fp32 model's accuracy on the attack's x', per variant."""
    import loaders
    from fastrobust.attacks import eval_mode, pgd_perturb, random_start
    from fastrobust.methods import Standard
    from kernels.reference import kl_divergence
    dev = resolve_device(device)
    rows = []
    for name in models:
        dataset = "mnist" if name == "smallcnn" else "cifar10"
        eps, step_size, steps = (0.3, 0.01, 20) if dataset == "mnist" else (0.031, 0.007, 10)   # the paper's attacks
        torch.manual_seed(seed)
        model = create_model(name, dataset=dataset).to(dev, memory_format=torch.channels_last)
        cfg = TrainConfig(dataset=dataset, model=name, method=Standard(), lr=0.05 if name == "smallcnn" else 0.02,
                          amp="off", compile=False, device=str(dev), batch_size=64).validate()
        train = TrainStep(cfg, model, dev)
        loader = loaders.build(dataset, "train", 64, dev, data_dir=data_dir, seed=seed, drop_last=True)
        for i, (x, y) in zip(range(train_steps), iter(loader)):
            train(x, y, step=i)
        x, y = sample_batch(dataset, batch, dev, data_dir)
        variants = {"fp32": (None, 0), "bf16": (torch.bfloat16, 0), "bf16, first step fp32": (torch.bfloat16, 1),
                    "bf16, first 2 steps fp32": (torch.bfloat16, 2)}
        with eval_mode(model), torch.no_grad():
            log_p = torch.log_softmax(model(x).float(), 1)
        for label, (amp, fp32_steps) in variants.items():
            g = torch.Generator(device=dev).manual_seed(seed)
            start = random_start(x, eps, "linf", "trades", generator=g)
            with eval_mode(model), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                x_adv = pgd_perturb(model, x, y, eps=eps, step_size=step_size, steps=steps, norm="linf",
                                    objective="kl", start=start, fp32_steps=fp32_steps).x_adv
            with eval_mode(model), torch.no_grad():
                logits = model(x_adv).float()
            kl = kl_divergence(log_p, torch.log_softmax(logits, 1))
            rows.append({"model": name, "variant": label, "eps": eps, "attack": f"PGD-{steps} step {step_size:g}",
                         "kl_mean": float(kl.mean()), "ra_fp32": float((logits.argmax(1) == y).float().mean()),
                         "na_fp32": float((log_p.argmax(1) == y).float().mean()), "n": len(y)})
    return rows


def precision_markdown(rows: list[dict]) -> str:
    base = {r["model"]: r["kl_mean"] for r in rows if r["variant"] == "fp32"}
    return markdown_table(["model", "attack", "variant", "final KL(p||q)", "KL / fp32's", "NA fp32 (%)",
                           "RA of x' under fp32 (%)", "n"],
                          [[r["model"], r["attack"], r["variant"], f"{r['kl_mean']:.4f}",
                            f"{r['kl_mean'] / base[r['model']]:.3f}", 100 * r["na_fp32"], 100 * r["ra_fp32"], r["n"]]
                           for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    from fastrobust.cli import exit_quietly_on_broken_pipe, run_reporting_errors
    p = argparse.ArgumentParser(prog=PROG, description="The TRADES training attack under bf16 autocast against fp32, "
                                "on briefly trained models (BENCHMARKS.md).")
    p.add_argument("--models", default="smallcnn,resnet18",
                   help="comma-separated, each briefly trained first (smallcnn on MNIST, others on CIFAR-10); "
                        "default: smallcnn,resnet18")
    p.add_argument("--batch", type=int, default=256, help="attacked test images; default: 256")
    p.add_argument("--train-steps", type=int, default=150, help="clean training steps first (batch 64); default: 150")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; default: auto")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $FASTROBUST_DATA, else ./data)")
    p.add_argument("--out", default="bench_out/attack-precision", help="report folder; default: %(default)s")

    def run() -> int:
        ns = p.parse_args(argv)
        models = [m for m in ns.models.split(",") if m]
        data = run_attack_precision(models, ns.device, ns.batch, ns.train_steps, ns.data_dir)
        text = f"Device: {device_description(resolve_device(ns.device))}.\n\n" + precision_markdown(data)
        print(text)
        out = Path(ns.out)
        write_json(out / "bench_attack-precision.json", data)
        atomic_write_text(out / "bench_attack-precision.md", text + "\n")
        print(f"written to {out}/bench_attack-precision.{{json,md}}")
        return 0

    return exit_quietly_on_broken_pipe(lambda: run_reporting_errors(run, prog=PROG))


if __name__ == "__main__":
    raise SystemExit(main())
