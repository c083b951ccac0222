"""Recipes: one thin module per table cell, ``python -m recipes.<dataset>_<method>_<arch>``.

A cell is (dataset, method, arch); a profile fills in the protocol:
  paper       the D-TRADES paper's protocol (DEVELOPERS.md); the default on a GPU.
  literature  the official TRADES (beta 6), MART and FAAL settings; D-TRADES with mean-normalised
              lambda scaled so its batch mean equals TRADES' beta 6.
  smoke       real data, a small subset and two epochs: a whole recipe in minutes on a 2-core CPU;
              the default without a GPU.

Every recipe runs distributed when launched by torchrun (``torchrun --nproc_per_node 8 -m
recipes.cifar10_dtrades_resnet18``): the protocol's batch size is the global batch, split across the
processes, so the learning rate and the results keep their meaning (README "Scaling out").
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

DATASETS = ("cifar10", "mnist")
METHODS = ("standard", "trades", "mart", "faal", "dtrades")
ARCHS = {"cifar10": ("resnet18", "vgg16"), "mnist": ("resnet18", "vgg16", "smallcnn")}
PROFILES = ("paper", "literature", "smoke")

PAPER_METHOD = {"standard": {}, "trades": {"beta": 4.0}, "mart": {"beta": 5.0},
                "faal": {"faal_r": 0.1, "faal_base": "trades", "beta": 4.0},
                "dtrades": {"lambda_alpha": 1.0, "lambda_beta": 1.0, "lambda_norm": "minmax", "lambda_scale": 1.0}}
PAPER_DATA = {
    "cifar10": {"epochs": 100, "lr": 0.1, "lr_schedule": "piecewise", "lr_milestones": (90.0, 100.0),
                "weight_decay": 2e-4, "eps": 0.031, "attack_steps": 10, "attack_step_size": 0.007},
    "mnist": {"epochs": 50, "lr": 0.01, "lr_schedule": "constant", "weight_decay": 0.0, "eps": 0.3,
              "attack_steps": 20, "attack_step_size": 0.01},
}


def profile_overrides(profile: str, dataset: str, method: str, arch: str) -> dict[str, Any]:
    """The TrainConfig fields a profile sets for one cell (eval options under the key "eval")."""
    base = {"dataset": dataset, "method": method, "model": arch, "batch_size": 128, "momentum": 0.9,
            **PAPER_DATA[dataset], **PAPER_METHOD[method]}
    if profile == "paper":
        return base
    if profile == "literature":
        if method == "trades":
            base.update(beta=6.0)
            base.update({"cifar10": dict(epochs=76, lr_milestones=(75.0, 90.0, 100.0)),
                         "mnist": dict(epochs=100, beta=1.0, attack_steps=40, lr_schedule="piecewise",
                                       lr_milestones=(55.0, 75.0, 90.0))}[dataset])
        elif method == "mart" and dataset == "cifar10":
            base.update(beta=5.0, epochs=120, lr=0.01, weight_decay=3.5e-3, lr_milestones=(75.0, 90.0, 100.0))
        elif method == "faal":
            # Official FAAL: a 2-epoch fine-tune of a robust (TRADES) checkpoint with r = 0.5, lr 0.01.
            base.update(faal_r=0.5, beta=6.0, epochs=2, lr=0.01, lr_schedule="piecewise", lr_milestones=(1.0,),
                        init_checkpoint=str(run_dir(dataset, "trades", arch, "literature") / "checkpoints" / "final.pt"))
        elif method == "dtrades":
            base.update(lambda_norm="mean", lambda_scale=3.0)  # batch-mean lambda = 3 x (1 + 1) = TRADES beta 6
        return base
    if profile == "smoke":
        # ResNet-18 / VGG-16 TRADES-10 steps run at ~6 img/s on 2 CPU cores: keep every pass small.
        # Standard AutoAttack spends minutes per surviving point there (Square: 5000 queries), so the
        # smoke profile runs its two APGD attacks, labelled as such in every table.
        cpu_sized = dict(num_samples=100, aa_samples=20, sweep_samples=20, batch_size=100,
                         sweep_multipliers=(0.0, 0.5, 1.0, 2.0), aa_version="custom",
                         aa_attacks=("apgd-ce", "apgd-t"))
        small = {"cifar10": dict(train_limit=256, batch_size=64, val_samples=32, eval=cpu_sized),
                 "mnist": dict(train_limit=2048, batch_size=128, val_samples=256,
                               eval=dict(num_samples=500, aa_samples=100, sweep_samples=100, batch_size=250))}[dataset]
        if arch != "smallcnn" and dataset == "mnist":
            small.update(train_limit=256, batch_size=64, val_samples=32, eval=cpu_sized)
        base.update(epochs=2, lr_schedule="constant", log_every=1, **small)
        if dataset == "cifar10" or arch != "smallcnn":
            # Eight steps from scratch at the protocol's lr 0.1 collapse ResNet-18/VGG-16 to one class
            # (measured: NA 6-8%, below chance); at 0.01 they learn (NA ~19% after one smoke epoch).
            base.update(lr=0.01)
        if method == "faal":
            base.pop("init_checkpoint", None)
        return base
    raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")


def run_dir(dataset: str, method: str, arch: str, profile: str, root: str | Path = "runs") -> Path:
    return Path(root) / f"{dataset}_{method}_{arch}" / profile


def make_config(dataset: str, method: str, arch: str, profile: str, root: str | Path = "runs",
                overrides: dict[str, Any] | None = None):
    from fastrobust.config import EvalConfig, TrainConfig

    values = profile_overrides(profile, dataset, method, arch)
    values.update(overrides or {})
    ev = values.pop("eval", {})
    values.setdefault("out_dir", str(run_dir(dataset, method, arch, profile, root)))
    if not isinstance(ev, dict):
        from fastrobust.errors import ConfigError
        raise ConfigError(f"eval overrides must be a mapping of evaluation options, got {ev!r}")
    # from_dict: an unknown key is a ConfigError with suggestions (the eval options included)
    cfg = TrainConfig.from_dict({**values, "eval": {**dataclasses.asdict(EvalConfig(dataset=dataset)), **ev}})
    return cfg.validate()


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    import ast

    from fastrobust.errors import ConfigError
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. --set epochs=2), got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip().replace("-", "_")] = raw
    return out


def main(dataset: str, method: str, arch: str, argv: Sequence[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog=f"python -m recipes.{dataset}_{method}_{arch}",
                                     description=f"{method} / {arch} / {dataset}")
    parser.add_argument("--profile", choices=PROFILES, default=None,
                        help="paper | literature | smoke (default: paper on a GPU, smoke on the CPU)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--runs", default="runs", help="root folder of run folders")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compare", default="", help="comma-separated methods trained beside this one, e.g. trades")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any TrainConfig field")
    ns = parser.parse_args(argv)
    from fastrobust import distributed as dist
    from fastrobust.cli import run_reporting_errors
    profile = ns.profile or ("paper" if torch.cuda.is_available() else "smoke")
    if ns.profile is None:
        dist.print0(f"profile: {profile} ({'a GPU is available' if profile == 'paper' else 'no GPU: CPU-feasible smoke run'};"
                    f" pass --profile to choose)")
    methods = [method] + [m for m in ns.compare.split(",") if m and m != method]

    def run() -> int:
        overrides = {"device": ns.device, "resume": ns.resume, **_parse_set(ns.set)}
        if ns.data_dir:
            overrides["data_dir"] = ns.data_dir
        return run_cells([(dataset, m, arch) for m in methods], profile, ns.runs, overrides)

    return run_reporting_errors(run, prog=parser.prog)


def run_cells(cells: Sequence[tuple[str, str, str]], profile: str, root: str | Path, overrides: dict[str, Any]) -> int:
    from fastrobust import distributed as dist
    from fastrobust.evaluate import results_markdown, save_results
    from fastrobust.report import atomic_write_text, plot_scatter
    from fastrobust.train import throughput_markdown, train

    results, throughput = {}, {}
    for dataset, method, arch in cells:
        cfg = make_config(dataset, method, arch, profile, root, overrides)
        dist.print0(f"== {method} / {arch} / {dataset} ({profile}) -> {cfg.out_dir}")
        summary = train(cfg)
        name = f"{dataset}_{method}_{arch}"
        throughput[name] = summary["throughput"]
        if "eval" in summary:
            results[name] = summary["eval"]
    if not dist.is_main():  # rank 0 writes and prints the comparison
        return 0
    if results:
        print(results_markdown(results))
    print(throughput_markdown(throughput))
    if len(cells) > 1:
        out = Path(root) / ("compare_" + "_vs_".join(m for _, m, _ in cells) + f"_{cells[0][2]}_{cells[0][0]}") / profile
        if results:
            save_results(results, out)
            plot_scatter(out / "na_ra.png", {k: (100 * r.na, 100 * r.ra.get("pgd", float("nan"))) for k, r in results.items()},
                         xlabel="natural accuracy (%)", ylabel="PGD robust accuracy (%)", title="NA against RA")
        atomic_write_text(out / "throughput.md", throughput_markdown(throughput))
        print(f"comparison written to {out}")
    return 0


def cell_main(module_name: str) -> None:
    """Entry point of a cell module: the module's name is the cell."""
    dataset, method, arch = module_name.rsplit(".", 1)[-1].split("_", 2)
    sys.exit(main(dataset, method, arch))
