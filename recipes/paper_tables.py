"""Build the paper's result tables from run folders; list (or emit) the runs still missing.

    python -m recipes.paper_tables                       # collect runs/<cell>/<profile>/results.json
    python -m recipes.paper_tables --run-missing         # train the missing cells here, one after another
    python -m recipes.paper_tables --emit-jobs jobs/     # one launch line per missing cell + a SLURM array
    python -m recipes.paper_tables --emit-jobs jobs/ --nproc-per-node 4 --nnodes 2   # torchrun, 2 x 4 GPUs a cell

Emitted jobs: ``jobs_<profile>.sh`` holds one shell line per missing cell (``python -m recipes.<cell>``,
or ``torchrun`` with several GPUs: ``--standalone`` on one node; with ``--nnodes`` > 1 a c10d
rendezvous at ``$MASTER_ADDR:$MASTER_PORT``, the same line started once on every node).
``jobs_<profile>.slurm`` is a SLURM array over those lines: each task sets the rendezvous from its
node list, starts the line on every node with ``srun``, and when SLURM signals the time limit
(``--signal=B:TERM@300``) forwards SIGTERM, so training checkpoints and exits, and requeues itself;
every line has ``--resume``. The batch size in the recipes is the global batch, so the results do not
depend on the number of GPUs. There is no scheduler of our own.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.paper_tables", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=PROFILES, default="paper")
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default=None, help="where tables.md goes (default: <runs>/paper_tables_<profile>.md)")
    p.add_argument("--emit-jobs", metavar="DIR", default=None, help="write launch commands for the missing cells")
    p.add_argument("--nproc-per-node", type=_positive, default=1,
                   help="GPUs per node in emitted commands (torchrun when > 1)")
    p.add_argument("--nnodes", type=_positive, default=1,
                   help="nodes per job in emitted commands (torchrun with a c10d rendezvous when > 1)")
    p.add_argument("--rdzv-port", type=_positive, default=29500, help="rendezvous port on the first node (--nnodes > 1)")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit per job in the emitted array")
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
            print("  " + launch_line(c, ns.profile, ns.runs, ns.nproc_per_node, ns.nnodes, ns.rdzv_port))
    if ns.emit_jobs:
        for path in emit_jobs(missing, ns.profile, ns.runs, Path(ns.emit_jobs), ns.nproc_per_node, ns.nnodes,
                              ns.time, ns.rdzv_port):
            print(f"wrote {path}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
