"""The paper's result tables, numbered and laid out as the paper numbers them, built from run folders.

    python -m recipes.paper_tables --profile paper        # collect runs/<cell>/<profile>/results.json
    python -m recipes.paper_tables --profile cpu          # the CPU-scale tables (MNIST SmallCNN)
    python -m recipes.paper_tables --run-missing          # train the missing cells here, one after another
    python -m recipes.paper_tables --emit-jobs jobs/ --nproc-per-node 4 --nnodes 2   # launch lines + SLURM array

Tables (numbers in %, one row per table row of the profile; per architecture k = 0, 1 the paper's
ResNet-18 and VGG-16 tables; a profile with other architectures gets the same layouts):
  6.1 / 6.2  the D-TRADES alpha/beta ablation: alpha = beta = 0.5 against 1.0, NA and RA, both datasets
  6.3 / 6.4  NA and RA (FGSM, PGD-20, AutoAttack) of every method, both datasets
  6.5 / 6.6  robustness drop RD = NA - RA
  6.7 / 6.8  attack success rate ASR = 1 - RA, and the conditional ASR (clean-correct points flipped)
Beside each of our numbers stands the seed's published one and the difference, where both exist
(:mod:`recipes.published`); the seed's own inconsistencies are flagged below the tables. RA columns
give a binomial standard error. Every header names the radius. ``--profile`` also writes an NA-RA
(Pareto) plot of its runs.

Emitted jobs: ``jobs_<profile>.sh`` holds one shell line per missing cell (``python -m recipes.<cell>``,
or ``torchrun`` with several GPUs); ``jobs_<profile>.slurm`` is a SLURM array over those lines that
forwards the time-limit SIGTERM, so training checkpoints and exits, and requeues itself (--resume).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from fastrobust.attacks import ATTACKS
from recipes import run_cells, run_dir
from recipes.protocols import ARCHS
from recipes.protocols import DISPLAY as NAMES
from recipes.protocols import PROFILES
from recipes.published import SEED, SOURCE

LABELS = {name: "AA" if name == "autoattack" else name.upper() for name in ATTACKS}
ABLATION = ("dtrades_half", "dtrades")
MISSING = "—"


def load(root: str | Path, profile: str) -> dict[tuple[str, str, str], dict]:
    found = {}
    for cell in PROFILES[profile].cells:
        path = run_dir(*cell, profile, root) / "results.json"
        if path.is_file():
            found[cell] = next(iter(json.loads(path.read_text()).values()))
    return found


def _ours(r: dict | None, key: str, attack: str | None) -> float | None:
    if r is None:
        return None
    v = r["na"] if key == "na" else r[key].get(attack) if key != "cond" else r["conditional_asr"].get(attack)
    return None if v is None else 100 * v


def cell_text(r: dict | None, seed: dict | None, key: str, attack: str | None = None, se: bool = False) -> str:
    """``ours ± se (seed s, Δ d)``, with the parts that exist."""
    ours = _ours(r, key, attack)
    theirs = None if seed is None or key == "cond" else (seed["na"] if key == "na" else seed[key].get(attack))
    text = MISSING if ours is None else f"{ours:.2f}"
    if ours is not None and se and key == "ra":
        n = r["n_attacked"][attack]
        text += f" ± {100 * math.sqrt(max(ours / 100 * (1 - ours / 100), 1 / n) / n):.1f}"
    if theirs is not None:
        text += f" (seed {theirs:.2f}" + (f", Δ {ours - theirs:+.2f})" if ours is not None else ")")
    return text


def radius(found: dict, profile: str, dataset: str) -> str:
    """The radius of the runs found (else the profile's evaluation radius), for the header."""
    eps = {round(r["config"]["eps"], 5) for (d, _, _), r in found.items() if d == dataset} or \
        {round(PROFILES[profile].eval[dataset]["eps"], 5)}
    return f"eps {', '.join(f'{e:g}' for e in sorted(eps))}"


def tables(found: dict, profile: str) -> str:
    prof = PROFILES[profile]
    datasets = list(dict.fromkeys(c[0] for c in prof.cells))   # in the profile's order
    archs = list(dict.fromkeys(c[2] for c in sorted(prof.cells, key=lambda c: list(NAMES).index(c[2]))))
    rows = [r for r in prof.rows if any(c[1] == r for c in prof.cells)]
    out = [f"# The paper's tables, {profile} profile", "",
           f"Our numbers from `runs/<cell>/{profile}/results.json`; '{MISSING}' marks a cell not run yet. Seed numbers: "
           f"{SOURCE}; they come from another evaluation protocol (recipes/published.py). Radii: "
           + "; ".join(f"{NAMES[d]} {radius(found, profile, d)}" for d in datasets)
           + f" (every attack of a dataset at its radius; RobustBench's CIFAR-10 standard is 8/255 = 0.03137)."
           + " PGD is PGD-" + "/".join(sorted({str(prof.eval[d].get("pgd_steps", 20)) for d in datasets})) + "."
           + points_note(found, datasets), ""]
    paper_archs = ARCHS["cifar10"]   # the paper's Tables 6.(2j+1) are ResNet-18's, 6.(2j+2) VGG-16's
    kinds = [(1, "the D-TRADES ablation, alpha = beta = 0.5 against 1.0", "ra", ABLATION),
             (3, "natural and robust accuracy", "ra", rows), (5, "robustness drop RD = NA - RA", "rd", rows),
             (7, "attack success rate ASR = 1 - RA, and conditional ASR", "asr", rows)]
    order = sorted((kind[0] + (paper_archs.index(a) if a in paper_archs else 1.5), arch_i, kind)
                   for arch_i, a in enumerate(archs) for kind in kinds)   # after the paper's two, other architectures
    for position, arch_i, (first, title, key, table_rows) in order:
        other_arch = archs[arch_i] not in paper_archs
        number = first if other_arch else int(position)
        arch = archs[arch_i]
        table_rows = [r for r in table_rows if r in rows]
        if not table_rows:
            continue
        label = f"Table 6.{number}" + (" layout" if other_arch else "")
        cols = [(d, kk, at) for d in datasets for kk, at in ([("na", None)] if key == "ra" else []) +
                [(key, at) for at in ATTACKS] + ([("cond", at) for at in ATTACKS] if key == "asr" else [])]
        head = [f"{NAMES[d]} {'NA' if kk == 'na' else LABELS[at] + (' cond.' if kk == 'cond' else '')}"
                for d, kk, at in cols]
        out += [f"## {label}: {NAMES[arch]}, {title} (%)", "", "| Row | " + " | ".join(head) + " | checks |",
                "|---|" + "---|" * (len(cols) + 1)]
        for row in table_rows:
            cells = [cell_text(found.get((d, row, arch)), SEED.get((d, row, arch)), kk, at, se=True)
                     for d, kk, at in cols]
            runs = [found.get((d, row, arch)) for d in datasets if found.get((d, row, arch))]
            checks = "—" if not runs else "all passed" if all(r.get("all_checks_passed") for r in runs) else \
                "**FAILED**: " + ", ".join(c["name"] for r in runs for c in r["checks"] if not c["passed"])
            out.append(f"| {row} | " + " | ".join(cells) + f" | {checks} |")
        out.append("")
    flags = seed_inconsistencies()
    if flags:
        out += ["## The seed's own inconsistencies", ""] + [f"- {f}" for f in flags] + [""]
    return "\n".join(out)


def points_note(found: dict, datasets: list[str]) -> str:
    """How many test points each column counts: AutoAttack usually runs on fewer, and its first points can be
    easier or harder than the rest, so its RA is compared with PGD's on the same points in the checks."""
    notes = []
    for d in datasets:
        runs = [r for (dd, _, _), r in found.items() if dd == d and "n" in r and "n_attacked" in r]
        if runs:
            counts = ", ".join(f"{LABELS[a]} {n}" for a, n in runs[0]["n_attacked"].items())
            notes.append(f"{NAMES[d]}: NA on {runs[0]['n']} test points, {counts}")
    if not notes:
        return ""
    return (" Points per column: " + "; ".join(notes) + " (RD and the ordering checks compare each attack with NA "
            "and PGD on its own points).")


def seed_inconsistencies(seed: dict = SEED) -> list[str]:
    """What cannot all be true in the seed's numbers: an AutoAttack RA above PGD's (impossible under one threat
    model), an RD that is not NA - RA, and two architectures' rows that are identical (one copied from another)."""
    flags = []
    for (d, row, arch), s in sorted(seed.items()):
        name = f"{NAMES[d]} {row} {NAMES[arch]}"
        if s["ra"]["autoattack"] > s["ra"]["pgd"] + 0.005:
            flags.append(f"{name}: AutoAttack RA {s['ra']['autoattack']:.2f} above PGD-20 RA {s['ra']['pgd']:.2f}, "
                         f"impossible under one threat model (the seed's code runs AutoAttack at eps 8/255 on every "
                         f"dataset, PGD at the training radius)")
        for at in ATTACKS:
            if abs(s["rd"][at] - (s["na"] - s["ra"][at])) > 0.015:
                why = (f" (it subtracts from the NA {s['aa_na']:.2f} of its 1000-point AutoAttack subset)"
                       if at == "autoattack" and abs(s["rd"][at] - (s["aa_na"] - s["ra"][at])) <= 0.015 else "")
                flags.append(f"{name}: RD ({LABELS[at]}) {s['rd'][at]:.2f} where NA - RA = {s['na']:.2f} - "
                             f"{s['ra'][at]:.2f} = {s['na'] - s['ra'][at]:.2f}{why}")
    by_row: dict[tuple, list] = {}
    for (d, row, arch), s in seed.items():
        for key in ("rd", "asr", "ra"):
            by_row.setdefault((d, row, key, tuple(s[key].values())), []).append(arch)
    for (d, row, key, _), arch_list in sorted(by_row.items()):
        if len(arch_list) > 1:
            flags.append(f"{NAMES[d]} {row}: the {key.upper()} row is identical for {' and '.join(map(NAMES.get, arch_list))}"
                         f", one table's row copied from another's")
    return flags


def pareto_plot(found: dict, path: Path) -> Path | None:
    from fastrobust.report import plot_scatter
    if not found:
        return None
    points = {}
    for (d, row, arch), r in found.items():
        attack = "autoattack" if "autoattack" in r["ra"] else "pgd"
        points[f"{row} ({NAMES[arch]}, {NAMES[d]})"] = (100 * r["na"], 100 * r["ra"][attack])
    return plot_scatter(path, points, xlabel="natural accuracy (%)", ylabel="robust accuracy (%, AutoAttack where run)",
                        title="NA against RA (up and right is better)")


def launch_line(cell: tuple[str, str, str], profile: str, root: str, nproc: int, nnodes: int = 1,
                rdzv_port: int = 29500) -> str:
    """The shell command that trains one cell: python (1 GPU), torchrun --standalone (1 node), or
    torchrun with a c10d rendezvous (several nodes: run it on each, with MASTER_ADDR set)."""
    module = f"recipes.{'_'.join(cell)}"
    args = f"--profile {profile} --runs {shlex.quote(root)} --resume"
    if nnodes > 1:
        return (f"torchrun --nnodes {nnodes} --nproc_per_node {nproc} --rdzv_backend c10d "
                f'--rdzv_endpoint "${{MASTER_ADDR:?set MASTER_ADDR to the first node}}:${{MASTER_PORT:-{rdzv_port}}}" '
                f'--rdzv_id "${{RDZV_ID:-{"_".join(cell)}}}" -m {module} {args}')
    if nproc > 1:
        return f"torchrun --standalone --nproc_per_node {nproc} -m {module} {args}"
    return f"python -m {module} {args}"


def emit_jobs(missing: list[tuple[str, str, str]], profile: str, root: str, out: Path, nproc: int,
              nnodes: int = 1, time_limit: str = "24:00:00", rdzv_port: int = 29500) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    lines = [launch_line(c, profile, root, nproc, nnodes, rdzv_port) for c in missing]
    jobs = out / f"jobs_{profile}.sh"
    where = (f"on each of {nnodes} nodes with MASTER_ADDR=<first node> (and MASTER_PORT, RDZV_ID) set"
             if nnodes > 1 else "anywhere, in any order")
    jobs.write_text("#!/usr/bin/env bash\n"
                    f"# One line per missing cell ({nnodes} node(s) x {nproc} GPU(s) each); run each {where}.\n"
                    "# --resume: a line started again continues from its newest checkpoint.\n"
                    + "\n".join(lines) + "\n")
    slurm = out / f"jobs_{profile}.slurm"
    slurm.write_text(SLURM_TEMPLATE.format(
        profile=profile, last=max(len(lines) - 1, 0), nnodes=nnodes, nproc=nproc, cpus=8 * nproc,
        time=time_limit, port=rdzv_port, jobs_name=jobs.name, jobs_path=shlex.quote(str(jobs.resolve()))))
    jobs.chmod(0o755)
    return [jobs, slurm]


# "wait" returns early when the trap runs, hence the loop; the trap forwards SIGTERM to srun, which
# passes it to torchrun / python on every node, and training checkpoints at its next step.
SLURM_TEMPLATE = """#!/usr/bin/env bash
#SBATCH --job-name=fastrobust-{profile}
#SBATCH --array=0-{last}
#SBATCH --nodes={nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%A_%a.out
# Array task i trains line i of {jobs_name} on {nnodes} node(s) x {nproc} GPU(s). 300 s before the time
# limit SLURM sends SIGTERM: it is forwarded to training, which writes a checkpoint at its next step
# and exits; the task then requeues itself, and --resume continues from that checkpoint.
set -uo pipefail
mapfile -t JOBS < <(grep -v -e '^#' -e '^$' {jobs_path})
CMD="${{JOBS[$SLURM_ARRAY_TASK_ID]}}"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT="${{MASTER_PORT:-{port}}}" RDZV_ID="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
echo "task $SLURM_ARRAY_TASK_ID on $SLURM_JOB_NODELIST: $CMD"
stopped=0
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$CMD" &
child=$!
trap 'stopped=1; kill -TERM "$child" 2>/dev/null' TERM
wait "$child"; status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
if [ "$stopped" = 1 ]; then
  echo "time limit: training checkpointed (status $status); requeueing"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$status"
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.paper_tables", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="paper", help="whose runs; default: paper")
    p.add_argument("--runs", default="runs", help="root folder of run folders; default: runs")
    p.add_argument("--out", default=None, help="tables file (default: <runs>/paper_tables_<profile>.md)")
    p.add_argument("--emit-jobs", metavar="DIR", default=None, help="write launch commands for the missing cells")
    p.add_argument("--nproc-per-node", type=_positive, default=1, help="GPUs per node in emitted commands; default: 1")
    p.add_argument("--nnodes", type=_positive, default=1, help="nodes per job in emitted commands; default: 1")
    p.add_argument("--rdzv-port", type=_positive, default=29500, help="rendezvous port (--nnodes > 1); default: 29500")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit per job; default: 24:00:00")
    p.add_argument("--run-missing", action="store_true", help="train the missing cells in this process, in order")
    ns = p.parse_args(argv)
    cells = PROFILES[ns.profile].cells
    found = load(ns.runs, ns.profile)
    missing = [c for c in cells if c not in found]
    if ns.run_missing and missing:
        for cell in missing:
            run_cells([cell], ns.profile, ns.runs, {"resume": True})
        found = load(ns.runs, ns.profile)
        missing = [c for c in cells if c not in found]
    text = tables(found, ns.profile)
    out = Path(ns.out) if ns.out else Path(ns.runs) / f"paper_tables_{ns.profile}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    plot = pareto_plot(found, out.with_name(out.stem + "_pareto.png"))
    print(text)
    print(f"\n{len(found)} of {len(cells)} cells present; tables written to {out}" + (f", plot {plot}" if plot else ""))
    if missing:
        print("missing runs:")
        for c in missing:
            print("  " + launch_line(c, ns.profile, ns.runs, ns.nproc_per_node, ns.nnodes, ns.rdzv_port))
    if ns.emit_jobs:
        for path in emit_jobs(missing, ns.profile, ns.runs, Path(ns.emit_jobs), ns.nproc_per_node, ns.nnodes,
                              ns.time, ns.rdzv_port):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
