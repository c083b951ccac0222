"""Build the paper's result tables from run folders; list (or emit) the runs still missing.

    python -m recipes.paper_tables                       # collect runs/<cell>/<profile>/results.json
    python -m recipes.paper_tables --run-missing         # train the missing cells here, one after another
    python -m recipes.paper_tables --emit-jobs jobs/     # one launch line per missing cell + a SLURM array

Tables (numbers in %, one row per method):
  6.1 / 6.2  CIFAR-10 NA and RA (FGSM, PGD-20, AutoAttack), ResNet-18 / VGG-16
  6.3 / 6.4  MNIST NA and RA, ResNet-18 / VGG-16
  6.5 / 6.6  robustness drop RD = NA - RA, ResNet-18 / VGG-16, both datasets
  6.7 / 6.8  attack success rate ASR = 1 - RA, ResNet-18 / VGG-16, both datasets
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from recipes import METHODS, PROFILES, run_cells, run_dir

ARCH_NAMES = {"resnet18": "ResNet-18", "vgg16": "VGG-16"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "mnist": "MNIST"}
ATTACKS = ("fgsm", "pgd", "autoattack")
MISSING = "missing"


def cells() -> list[tuple[str, str, str]]:
    return [(d, m, a) for d in DATASET_NAMES for a in ARCH_NAMES for m in METHODS]


def load(root: str | Path, profile: str) -> dict[tuple[str, str, str], dict]:
    found = {}
    for cell in cells():
        path = run_dir(*cell, profile, root) / "results.json"
        if path.is_file():
            found[cell] = next(iter(json.loads(path.read_text()).values()))
    return found


def _pct(v) -> str:
    return MISSING if v is None else f"{100 * v:.2f}"


def tables(found: dict, profile: str) -> str:
    out = [f"# D-TRADES paper tables ({profile} profile)", "",
           f"Cells marked '{MISSING}' have no run folder yet; `--emit-jobs` writes their launch commands.", ""]
    n = 1
    for dataset in DATASET_NAMES:
        for arch in ARCH_NAMES:
            out += [f"## Table 6.{n}: {DATASET_NAMES[dataset]}, {ARCH_NAMES[arch]}: accuracy (%)", "",
                    "| Method | Natural | FGSM | PGD-20 | AutoAttack | checks |", "|---|---|---|---|---|---|"]
            for m in METHODS:
                r = found.get((dataset, m, arch))
                if r is None:
                    out.append(f"| {m} | " + " | ".join([MISSING] * 4) + " | — |")
                else:
                    ok = "all passed" if r.get("all_checks_passed") else "**FAILED**"
                    out.append(f"| {m} | {_pct(r['na'])} | " + " | ".join(_pct(r["ra"].get(a)) for a in ATTACKS) + f" | {ok} |")
            out.append("")
            n += 1
    for key, title in (("rd", "robustness drop RD = NA - RA"), ("asr", "attack success rate ASR = 1 - RA")):
        for arch in ARCH_NAMES:
            out += [f"## Table 6.{n}: {ARCH_NAMES[arch]}: {title} (%)", "",
                    "| Method | " + " | ".join(f"{DATASET_NAMES[d]} {a}" for d in DATASET_NAMES for a in ("FGSM", "PGD-20", "AA")) + " |",
                    "|---|" + "---|" * 6]
            for m in METHODS:
                vals = []
                for d in DATASET_NAMES:
                    r = found.get((d, m, arch))
                    vals += [_pct(r[key].get(a)) if r else MISSING for a in ATTACKS]
                out.append(f"| {m} | " + " | ".join(vals) + " |")
            out.append("")
            n += 1
    return "\n".join(out)


def launch_line(cell: tuple[str, str, str], profile: str, root: str, nproc: int) -> str:
    module = f"recipes.{'_'.join(cell)}"
    args = f"--profile {profile} --runs {shlex.quote(root)} --resume"
    if nproc > 1:
        return f"torchrun --standalone --nproc_per_node {nproc} -m {module} {args}"
    return f"python -m {module} {args}"


def emit_jobs(missing: list[tuple[str, str, str]], profile: str, root: str, out: Path, nproc: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    lines = [launch_line(c, profile, root, nproc) for c in missing]
    jobs = out / f"jobs_{profile}.sh"
    jobs.write_text("#!/usr/bin/env bash\n# One line per missing cell; run them anywhere, in any order.\n" + "\n".join(lines) + "\n")
    slurm = out / f"jobs_{profile}.slurm"
    slurm.write_text(
        "#!/usr/bin/env bash\n"
        f"#SBATCH --job-name=fastrobust-{profile}\n"
        f"#SBATCH --array=0-{max(len(lines) - 1, 0)}\n"
        f"#SBATCH --gpus-per-task={nproc}\n#SBATCH --cpus-per-task={8 * nproc}\n#SBATCH --time=24:00:00\n"
        "#SBATCH --output=slurm-%A_%a.out\n"
        "# Each array task runs one missing cell; --resume makes requeued tasks continue where they stopped.\n"
        "set -euo pipefail\n"
        f"mapfile -t JOBS < <(grep -v '^#' {shlex.quote(str(jobs.resolve()))})\n"
        'eval "${JOBS[$SLURM_ARRAY_TASK_ID]}"\n')
    jobs.chmod(0o755)
    return [jobs, slurm]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.paper_tables", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=PROFILES, default="paper")
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default=None, help="where tables.md goes (default: <runs>/paper_tables_<profile>.md)")
    p.add_argument("--emit-jobs", metavar="DIR", default=None, help="write launch commands for the missing cells")
    p.add_argument("--nproc-per-node", type=int, default=1, help="GPUs per job in emitted commands (torchrun when > 1)")
    p.add_argument("--run-missing", action="store_true", help="train the missing cells in this process")
    ns = p.parse_args(argv)
    found = load(ns.runs, ns.profile)
    missing = [c for c in cells() if c not in found]
    if ns.run_missing and missing:
        for cell in missing:
            run_cells([cell], ns.profile, ns.runs, {})
        found = load(ns.runs, ns.profile)
        missing = [c for c in cells() if c not in found]
    text = tables(found, ns.profile)
    out = Path(ns.out) if ns.out else Path(ns.runs) / f"paper_tables_{ns.profile}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    print(f"\n{len(found)} of {len(cells())} cells present; tables written to {out}")
    if missing:
        print("missing runs:")
        for c in missing:
            print("  " + launch_line(c, ns.profile, ns.runs, ns.nproc_per_node))
    if ns.emit_jobs:
        for path in emit_jobs(missing, ns.profile, ns.runs, Path(ns.emit_jobs), ns.nproc_per_node):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
