"""Recipes: ``python -m recipes.<dataset>_<row>_<arch>`` trains one cell of the paper's tables under a profile.

The protocols are tables in :mod:`recipes.protocols`; a cell module is not a file but a name: this
package resolves ``recipes.cifar10_dtrades_resnet18`` (every cell of every profile, listed by
``python -m recipes``) to :func:`main` for that cell. Profiles: ``--profile paper|official|smoke|demo|cpu``
(default: paper on a GPU, smoke on a CPU for the cells smoke covers).

Every recipe runs distributed when launched by torchrun (``torchrun --nproc_per_node 8 -m
recipes.cifar10_dtrades_resnet18``): the protocol's batch size is the global batch, split across the
processes, so the learning rate and the results keep their meaning (README "Scaling out").
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.abc
import importlib.machinery
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .protocols import PROFILES, Profile, protocol_notes


def all_cells() -> dict[str, tuple[str, str, str]]:
    """Module name -> (dataset, row, arch), for every cell of every profile."""
    return {f"{d}_{r}_{a}": (d, r, a) for p in PROFILES.values() for d, r, a in p.cells}


class _CellFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``recipes.<cell>`` to a module whose code runs that cell's recipe."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + ".") and fullname.rsplit(".", 1)[1] in all_cells():
            return importlib.machinery.ModuleSpec(fullname, self, origin="recipes.protocols")
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.CELL = all_cells()[module.__name__.rsplit(".", 1)[1]]
        if module.__name__ == "__main__":
            sys.exit(main(*module.CELL))

    def get_code(self, fullname):  # what ``python -m`` runs
        return compile(f"import sys, recipes\nsys.exit(recipes.main(*recipes.all_cells()[{fullname.rsplit('.', 1)[1]!r}]))",
                       f"<recipe {fullname}>", "exec")


if not any(isinstance(f, _CellFinder) for f in sys.meta_path):
    sys.meta_path.append(_CellFinder())


def run_dir(dataset: str, row: str, arch: str, profile: str, root: str | Path = "runs", seed: int = 0) -> Path:
    """``<root>/<dataset>_<row>_<arch>/<profile>/seed<k>``: one run folder per training seed."""
    return Path(root) / f"{dataset}_{row}_{arch}" / profile / f"seed{seed}"


def parse_seeds(text: str | None) -> tuple[int, ...] | None:
    """``--seeds 0,1,2`` -> (0, 1, 2); None or empty: the profile's seeds."""
    from fastrobust.errors import ConfigError
    if not text:
        return None
    try:
        seeds = tuple(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers >= 0, e.g. --seeds 0,1,2; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds takes comma-separated integers >= 0, e.g. --seeds 0,1,2; got {text!r}")
    return seeds


def settings(profile: Profile, dataset: str, row: str, arch: str) -> dict[str, Any]:
    """The TrainConfig fields a profile sets for one cell (eval options under "eval")."""
    values = {"dataset": dataset, "model": arch, "method": profile.rows[row], **profile.data[dataset]}
    values["eval"] = dict(profile.eval[dataset])
    extra = dict(profile.cell.get((dataset, row, arch), {}))
    values["eval"].update(extra.pop("eval", {}))
    values.update(extra)
    return values


def make_config(dataset: str, row: str, arch: str, profile: str, root: str | Path = "runs",
                overrides: dict[str, Any] | None = None, seed: int = 0):
    from fastrobust.config import EvalConfig, TrainConfig
    from fastrobust.errors import ConfigError, unknown_name

    if profile not in PROFILES:
        raise unknown_name("profile", profile, PROFILES)
    prof = PROFILES[profile]
    if (dataset, row, arch) not in prof.cells:
        having = sorted(p.name for p in PROFILES.values() if (dataset, row, arch) in p.cells)
        raise ConfigError(f"profile {profile!r} has no cell {dataset}_{row}_{arch}; profiles with it: "
                          f"{', '.join(having) or 'none'}.")
    values = settings(prof, dataset, row, arch)
    values["seed"] = seed   # the training seed; the evaluation's attacks keep their own seed, the same for every run
    init_from = values.pop("init_from", None)
    if init_from:  # a fine-tune of the same seed's final checkpoint of another cell (FAAL's official protocol)
        values["init_checkpoint"] = str(run_dir(dataset, init_from, arch, profile, root, seed) / "checkpoints" /
                                        "final.pt")
    overrides = dict(overrides or {})
    options = method_options(overrides)   # "<method>_<option>" keys: options of that method's rows only
    if values["method"].name in options:
        values["method"] = dataclasses.replace(values["method"], **options[values["method"].name])
    ev = {**values.pop("eval"), **(overrides.pop("eval", None) or {})} if isinstance(overrides.get("eval", {}), dict) \
        else overrides.pop("eval")
    if not isinstance(ev, dict):
        raise ConfigError(f"eval overrides must be a mapping of evaluation options, got {ev!r}")
    if isinstance(overrides.get("attack"), dict):   # merged into the profile's training attack, as eval is
        overrides["attack"] = {**values.get("attack", {}), **overrides["attack"]}
    values.update(overrides)
    if "seed" in overrides:
        raise ConfigError("the training seed is an axis of the recipes: pass --seeds 3 (or 0,1,2), not --set seed=3.")
    values.setdefault("out_dir", str(run_dir(dataset, row, arch, profile, root, seed)))
    cfg = TrainConfig.from_dict({**values, "eval": {**dataclasses.asdict(EvalConfig(dataset=dataset)), **ev}})
    return cfg.validate()


def method_options(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pop the ``<method>_<option>`` keys of ``overrides`` (e.g. ``dtrades_sync``, as the CLI's
    ``--dtrades-sync``): method name -> its options."""
    from fastrobust.methods import METHODS
    out: dict[str, dict[str, Any]] = {}
    for key in list(overrides):
        for name, cls in METHODS.items():
            option = key[len(name) + 1:] if key.startswith(name + "_") else None
            if option in {f.name for f in dataclasses.fields(cls)}:
                out.setdefault(name, {})[option] = overrides.pop(key)
    return out


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
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


def main(dataset: str, row: str, arch: str, argv: Sequence[str] | None = None) -> int:
    """A cell's command line (``python -m recipes.<cell>``); output into a pipe that closes early ends
    quietly with status 141 (fastrobust.cli.exit_quietly_on_broken_pipe)."""
    from fastrobust.cli import exit_quietly_on_broken_pipe
    return exit_quietly_on_broken_pipe(lambda: _main(dataset, row, arch, argv))


def _main(dataset: str, row: str, arch: str, argv: Sequence[str] | None) -> int:
    import torch

    prog = f"python -m recipes.{dataset}_{row}_{arch}"
    parser = argparse.ArgumentParser(prog=prog, description=f"{row} / {arch} / {dataset} (recipes/protocols.py)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="protocol (recipes/protocols.py); default: paper on a GPU, smoke on a CPU")
    parser.add_argument("--data-dir", default=None, help="dataset root (default: $FASTROBUST_DATA, else ./data)")
    parser.add_argument("--runs", default="runs", help="root folder of run folders; default: runs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; default: auto")
    parser.add_argument("--compare", default="", help="comma-separated rows trained beside this one, e.g. trades")
    parser.add_argument("--step-bench", action="store_true",
                        help="also measure the step-cost ratio of the compared rows (interleaved, same process)")
    parser.add_argument("--resume", action="store_true", help="continue each run from its newest checkpoint")
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="training seeds, comma-separated (e.g. 0,1,2): one run folder per seed, "
                             "<runs>/<cell>/<profile>/seed<k>; default: the profile's seeds for this row (0 unless "
                             "the profile says otherwise)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override any TrainConfig field or method option, e.g. --set epochs=2 dtrades_sync=global "
                             "\"eval={'aa_samples': 100}\" (a method option applies to that method's rows)")
    ns = parser.parse_args(argv)
    from fastrobust import distributed as dist
    from fastrobust.cli import run_reporting_errors
    gpu = torch.cuda.is_available()
    profile = ns.profile or ("paper" if gpu else "smoke")
    rows = [row] + [r for r in ns.compare.split(",") if r and r != row]

    def run() -> int:
        if ns.profile is None:
            dist.print0(f"profile: {profile} ({'a GPU is available' if gpu else 'no GPU: the CPU-feasible smoke run'}; "
                        f"pass --profile to choose)")
        overrides = {"device": ns.device, "resume": ns.resume, **_parse_set(ns.set)}
        if ns.data_dir:
            overrides["data_dir"] = ns.data_dir
        seeds = parse_seeds(ns.seeds)
        configs = [make_config(dataset, r, arch, profile, ns.runs, overrides, seed)   # bad input fails here
                   for r in rows for seed in (seeds or PROFILES[profile].seeds_of(r))]
        unused = set(method_options(dict(overrides))) - {c.method.name for c in configs}
        if unused:
            from fastrobust.errors import ConfigError
            raise ConfigError(f"--set gives options of {', '.join(sorted(unused))}, but no trained row uses that "
                              f"method (rows: {', '.join(rows)}).")
        check_output_folders([(dataset, r, arch) for r in rows], profile, ns.runs, configs)
        if profile == "smoke":
            dist.print0(cost_statement(dataset, rows, arch, configs[0].data_dir))
        return run_cells([(dataset, r, arch) for r in rows], profile, ns.runs, overrides, ns.step_bench, seeds)

    return run_reporting_errors(run, prog=prog)


def cost_statement(dataset: str, rows: Sequence[str], arch: str, data_dir: str | None) -> str:
    """What the paper profile would cost here: two measured steps of its configuration x its step count."""
    from fastrobust.bench import run_step_bench
    from fastrobust.errors import DataError
    cfg = make_config(dataset, rows[0], arch, "paper", overrides={"data_dir": data_dir} if data_dir else None)
    try:
        report = run_step_bench([cfg.method], [arch], [cfg.batch_size], cfg.device, dataset=dataset,
                                repeats=1, warmup=1, reference=False, data_dir=data_dir,
                                attack_steps=cfg.attack.steps, progress=False)
    except DataError as e:
        return f"What the paper profile would cost here is unknown (no data to time a step: {e})."
    seconds = report["rows"][0]["ms_median"] / 1e3
    import loaders
    steps = cfg.epochs * ((loaders.dataset_info(dataset).num_samples["train"] - cfg.val_samples) // cfg.batch_size)
    total = seconds * steps * len(rows)
    return (f"This device ({report['device']}) takes {seconds:.1f} s per {cfg.batch_size}-image step of the paper "
            f"protocol, so the paper profile's {steps} steps per run would take {total / 3600:.0f} hours "
            f"({total / 86400:.1f} days) for {len(rows)} run(s). The smoke run below checks the pipeline, not accuracy. "
            f"On a GPU: python -m recipes.{dataset}_{rows[0]}_{arch} --profile paper"
            + (f" --compare {','.join(rows[1:])}" if len(rows) > 1 else ""))


def compare_dir(cells: Sequence[tuple[str, str, str]], profile: str, root: str | Path) -> Path:
    """Where :func:`run_cells` writes the comparison of several cells."""
    return Path(root) / ("compare_" + "_vs_".join(r for _, r, _ in cells) + f"_{cells[0][2]}_{cells[0][0]}") / profile


def check_output_folders(cells: Sequence[tuple[str, str, str]], profile: str, root: str | Path, configs) -> None:
    """Every folder a recipe writes into, created or checked before anything is trained or timed: the runs
    root, each run folder and, for several cells, the comparison folder."""
    from fastrobust.report import check_output_folder
    check_output_folder(root, "--runs")
    for cfg in configs:
        check_output_folder(cfg.out_dir, "run folder")
    if len(cells) > 1:
        check_output_folder(compare_dir(cells, profile, root), "comparison folder")


def run_cells(cells: Sequence[tuple[str, str, str]], profile: str, root: str | Path, overrides: dict[str, Any],
              step_bench: bool = False, seeds: Sequence[int] | None = None) -> int:
    """Train each cell for each seed (``seeds``, else the profile's seeds of its row), one after another."""
    from fastrobust import distributed as dist
    from fastrobust import report
    from fastrobust.train import train

    results, throughput, configs = {}, {}, []
    for dataset, row, arch in cells:
        row_seeds = tuple(seeds or PROFILES[profile].seeds_of(row))
        for seed in row_seeds:
            cfg = make_config(dataset, row, arch, profile, root, overrides, seed)
            if seed == row_seeds[0]:
                configs.append(cfg)   # the step-cost comparison times one config per row
            dist.print0(f"== {row} / {arch} / {dataset} ({profile}, seed {seed}) -> {cfg.out_dir}")
            start = time.perf_counter()
            summary = train(cfg, {"protocol_notes": protocol_notes(profile, dataset, row, arch)})
            if dist.is_main():
                report.write_json(Path(cfg.out_dir) / "run_time.json", {"wall_s": time.perf_counter() - start})
            name = f"{dataset}_{row}_{arch}" + (f"_seed{seed}" if len(row_seeds) > 1 else "")
            throughput[name] = summary["throughput"]
            if "eval" in summary:
                results[name] = summary["eval"]
    if not dist.is_main():  # rank 0 writes and prints the comparison
        return 0
    if results:
        print(report.results_markdown(results))
    print(report.throughput_markdown(throughput))
    if len(cells) > 1:
        out = compare_dir(cells, profile, root)
        if results:
            report.save_results(results, out)
        text = report.throughput_markdown(throughput)
        if step_bench:
            cost = step_cost(configs)
            print(cost)
            text += "\n" + cost
        report.atomic_write_text(out / "throughput.md", text)
        print(f"comparison written to {out}")
    return 0


def step_cost(configs) -> str:
    """The compared rows' steps timed against each other in one process by the step bench
    (:func:`fastrobust.bench.run_step_bench`): per row wall and CPU ms/step and GFLOP/step, and the ratios
    of each row to the last one (the baseline: the row --compare named last, TRADES in the demo)."""
    from fastrobust.bench import run_step_bench, step_markdown
    names = [Path(c.out_dir).parents[1].name for c in configs]   # the cells' names: two rows may share a method
    report = run_step_bench(configs=dict(zip(names, configs)), repeats=5, warmup=1, reference=False, progress=False)
    return "**Step cost** of the compared rows\n\n" + step_markdown(report)
