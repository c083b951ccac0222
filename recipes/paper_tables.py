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
RA columns give a binomial standard error. Every header names the radius. ``--profile`` also writes an
NA-RA (Pareto) plot of its runs.

The report's numbers (:mod:`recipes.published`), with ``--profile paper`` only: all 232 numbers of its
printed Tables 6.1-6.8 stand beside the matching cells ("report", and the difference ours - printed where
we have a number; a cell not run yet still shows the printed number), and where the report's repository
stores a result of that model that disagrees with the printed one, it stands beside it too ("repository").
Only the paper profile trains the report's protocol; beside any other profile (official: other
hyperparameters; smoke, demo, cpu: other radii and budgets) the report's numbers would read as a
comparison they are not, so those tables show none. Below the paper tables: every inconsistency the rules
of :mod:`recipes.report_checks` find in the printed tables, in them against the repository's stored
results, and in the text's claims (:mod:`recipes.report_claims`) against the tables; then the stored
results' own.

Emitted jobs: ``jobs_<profile>.sh`` holds one shell line per missing cell (``python -m recipes.<cell>``,
or ``torchrun`` with several GPUs); ``jobs_<profile>.slurm`` is a SLURM array over those lines that
forwards the time-limit SIGTERM, so training checkpoints and exits, and requeues itself (--resume).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Sequence

from fastrobust.attacks import ATTACKS
from recipes import run_cells, run_dir
from recipes.questions import tested_claims
from recipes.protocols import ABLATION, ARCHS
from recipes.protocols import DISPLAY as NAMES
from recipes.protocols import PROFILES
from recipes.published import PRINTED, PRINTED_SOURCE, SEED, STORED, STORED_SOURCE, Published, printed_value, \
    stored_value
from recipes.report_checks import NUMERIC_SLACK, RULES, Flag, report_flags
from recipes.report_claims import CLAIMS

LABELS = {name: "AA" if name == "autoattack" else name.upper() for name in ATTACKS}
MISSING = "—"
REPORT_PROFILE = "paper"   # the profile that trains the report's protocol: the only one beside its numbers


def cell_seeds(profile: str, cell: tuple[str, str, str], seeds: Sequence[int] | None = None) -> tuple[int, ...]:
    return tuple(seeds or PROFILES[profile].seeds_of(cell[1]))


def load(root: str | Path, profile: str, seeds: Sequence[int] | None = None) -> dict[tuple[str, str, str], dict]:
    """cell -> its first seed's results, with every seed's found under "seeds" ({seed: results}). A cell is
    found when at least one of its seeds (``seeds``, else the profile's for its row) has results."""
    found = {}
    for cell in PROFILES[profile].cells:
        per_seed = {}
        for seed in cell_seeds(profile, cell, seeds):
            path = run_dir(*cell, profile, root, seed) / "results.json"
            if path.is_file():
                per_seed[seed] = next(iter(json.loads(path.read_text()).values()))
        if per_seed:
            found[cell] = {**next(iter(per_seed.values())), "seeds": per_seed}
    return found


def missing_runs(found: dict, profile: str, seeds: Sequence[int] | None = None) -> list[tuple[tuple[str, str, str], int]]:
    """(cell, seed) of every run the profile asks for that has no results yet."""
    return [(cell, seed) for cell in PROFILES[profile].cells for seed in cell_seeds(profile, cell, seeds)
            if seed not in found.get(cell, {}).get("seeds", {})]


def _value(r: dict, key: str, attack: str | None) -> float | None:
    v = r["na"] if key == "na" else r[key].get(attack) if key != "cond" else r["conditional_asr"].get(attack)
    return None if v is None else 100 * v


def seed_values(r: dict | None, key: str, attack: str | None) -> dict[int, float]:
    """Our value of one column (%), per seed found."""
    if r is None:
        return {}
    runs = r.get("seeds") or {0: r}
    values = {seed: _value(run, key, attack) for seed, run in runs.items()}
    return {seed: v for seed, v in values.items() if v is not None}


def _ours(r: dict | None, key: str, attack: str | None) -> float | None:
    """The mean over seeds of one column (%)."""
    values = list(seed_values(r, key, attack).values())
    return statistics.fmean(values) if values else None


def published_numbers(profile: str, table: str | None, dataset: str, row: str, arch: str, key: str,
                      attack: str | None) -> tuple[Published | None, Published | None]:
    """(the report's printed number, the repository's stored one) of one cell of Table ``table`` ("6.3");
    none for a profile other than the report's, a table the report does not print, or the conditional ASR."""
    if profile != REPORT_PROFILE or table is None or key == "cond":
        return None, None
    return printed_value(table, dataset, row, arch, key, attack), stored_value(dataset, row, arch, key, attack)


def _beside(label: str, theirs: Published, ours: float | None) -> str:
    return f"{label} {theirs.text}" + (f", Δ {ours - theirs.value:+.2f}" if ours is not None else "")


def cell_text(r: dict | None, printed: Published | None, stored: Published | None, key: str,
              attack: str | None = None, se: bool = False) -> str:
    """``ours ± se (report p, Δ d; repository s, Δ d)``, with the parts that exist: Δ is ours - theirs; the
    repository's stored number appears only where it disagrees with the printed one beyond their rounding."""
    ours = _ours(r, key, attack)
    text = MISSING if ours is None else f"{ours:.2f}"
    values = list(seed_values(r, key, attack).values())
    if len(values) > 1:   # several seeds: their spread, not one evaluation's binomial error
        text += f" ± {statistics.stdev(values):.2f} (n={len(values)})"
    elif ours is not None and se and key == "ra":
        n = r["n_attacked"][attack]
        text += f" ± {100 * math.sqrt(max(ours / 100 * (1 - ours / 100), 1 / n) / n):.1f}"
    beside = [_beside("report", printed, ours)] if printed is not None else []
    if stored is not None and (printed is None or abs(stored.value - printed.value) >
                               stored.half_unit + printed.half_unit + NUMERIC_SLACK):
        beside.append(_beside("repository", stored, ours))
    return text + (f" ({'; '.join(beside)})" if beside else "")


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
           f"Our numbers from `runs/<cell>/{profile}/results.json`; '{MISSING}' marks a cell not run yet. "
           + sources_note(profile) + " Radii: "
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
            cells = [cell_text(found.get((d, row, arch)),
                               *published_numbers(profile, None if other_arch else f"6.{number}", d, row, arch, kk, at),
                               kk, at, se=True) for d, kk, at in cols]
            runs = [run for d in datasets if found.get((d, row, arch))
                    for run in (found[(d, row, arch)].get("seeds") or {0: found[(d, row, arch)]}).values()]
            checks = "—" if not runs else "all passed" if all(r.get("all_checks_passed") for r in runs) else \
                "**FAILED**: " + ", ".join(dict.fromkeys(c["name"] for r in runs for c in r["checks"] if not c["passed"]))
            out.append(f"| {row} | " + " | ".join(cells) + f" | {checks} |")
        out.append("")
    if profile == REPORT_PROFILE:
        out += flags_markdown(report_inconsistencies())
        stored = seed_inconsistencies()
        if stored:
            out += (["## The repository's stored results: their own inconsistencies", ""]
                    + [f"- {f}" for f in stored] + [""])
    return "\n".join(out)


def sources_note(profile: str) -> str:
    if profile != REPORT_PROFILE:
        return (f"The report's numbers stand only beside the {REPORT_PROFILE} profile, the one that trains its "
                f"protocol (recipes/paper_tables.py).")
    return (f"Beside each cell: 'report', {PRINTED_SOURCE}, and Δ = ours - printed; 'repository', where it "
            f"disagrees with the printed number, {STORED_SOURCE}. Both come from the report's own evaluation "
            f"code, which is not this project's protocol (recipes/published.py).")


def report_inconsistencies() -> list[Flag]:
    """Every rule of :mod:`recipes.report_checks` over the printed tables, the stored results and the text's
    claims."""
    return report_flags(PRINTED, STORED, CLAIMS)


def flags_markdown(flags: Sequence[Flag]) -> list[str]:
    """The flags under a heading per rule, in the rules' order."""
    if not flags:
        return []
    out = ["## The report's inconsistencies", "",
           f"Found by rules in code (recipes/report_checks.py) over its printed tables, its repository's stored "
           f"results, and {len(CLAIMS)} claims of its text (recipes/report_claims.py): {len(flags)} flags. A "
           f"printed number is taken to half a unit of its last digit.", ""]
    for rule in RULES:
        group = [f for f in flags if f.rule == rule]
        if group:
            out += [f"**{rule}** ({len(group)})", ""] + [f"- {f}" for f in group] + [""]
    return out


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
    """What cannot all be true in the repository's stored results (the report's own model files): an AutoAttack
    RA above PGD's (impossible under one threat model), an RD that is not NA - RA, and two architectures' rows
    that are identical (one copied from another)."""
    flags = []
    for (d, row, arch), s in sorted(seed.items()):
        name = f"{NAMES[d]} {row} {NAMES[arch]}"
        if s["ra"]["autoattack"] > s["ra"]["pgd"] + 0.005:
            flags.append(f"{name}: AutoAttack RA {s['ra']['autoattack']:.2f} above PGD-20 RA {s['ra']['pgd']:.2f}, "
                         f"impossible under one threat model (the report's code runs AutoAttack at eps 8/255 on every "
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


def write_values(found: dict, stem: Path) -> list[Path]:
    """Every seed's value of every column, long format: ``<stem>.csv`` and ``<stem>.json``."""
    from fastrobust.report import csv_text, write_json, atomic_write_text
    rows = []
    for (d, row, arch), r in sorted(found.items()):
        for seed, run in sorted(r["seeds"].items()):
            for key, attack in [("na", None)] + [(k, a) for k in ("ra", "rd", "asr", "cond") for a in ATTACKS]:
                v = _value(run, key, attack)
                if v is not None:
                    n = run.get("n") if key == "na" else run.get("n_attacked", {}).get(attack)
                    rows.append([d, row, arch, seed, key, attack or "", round(v, 4), n])
    head = ["dataset", "row", "arch", "seed", "metric", "attack", "value_percent", "points"]
    return [atomic_write_text(stem.with_suffix(".csv"), csv_text(head, rows)),
            write_json(stem.with_suffix(".json"), [dict(zip(head, r)) for r in rows])]


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
                rdzv_port: int = 29500, seed: int = 0) -> str:
    """The shell command that trains one seed of one cell: python (1 GPU), torchrun --standalone (1 node),
    or torchrun with a c10d rendezvous (several nodes: run it on each, with MASTER_ADDR set)."""
    module = f"recipes.{'_'.join(cell)}"
    args = f"--profile {profile} --runs {shlex.quote(root)} --seeds {seed} --resume"
    if nnodes > 1:
        return (f"torchrun --nnodes {nnodes} --nproc_per_node {nproc} --rdzv_backend c10d "
                f'--rdzv_endpoint "${{MASTER_ADDR:?set MASTER_ADDR to the first node}}:${{MASTER_PORT:-{rdzv_port}}}" '
                f'--rdzv_id "${{RDZV_ID:-{"_".join(cell)}_seed{seed}}}" -m {module} {args}')
    if nproc > 1:
        return f"torchrun --standalone --nproc_per_node {nproc} -m {module} {args}"
    return f"python -m {module} {args}"


def emit_jobs(missing: list[tuple[tuple[str, str, str], int]], profile: str, root: str, out: Path, nproc: int,
              nnodes: int = 1, time_limit: str = "24:00:00", rdzv_port: int = 29500) -> list[Path]:
    """``missing``: (cell, seed) pairs, one line (one array task) each."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [launch_line(c, profile, root, nproc, nnodes, rdzv_port, seed) for c, seed in missing]
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
    p.add_argument("--run-missing", action="store_true", help="train the missing runs in this process, in order")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="training seeds of every cell, comma-separated (e.g. 0,1,2); default: the profile's seeds "
                        "per row (0 unless the profile says otherwise)")
    from fastrobust.cli import exit_quietly_on_broken_pipe, run_reporting_errors
    return exit_quietly_on_broken_pipe(lambda: run_reporting_errors(lambda: _run(p.parse_args(argv)),
                                                                    prog="python -m recipes.paper_tables"))


def _run(ns: argparse.Namespace) -> int:
    from fastrobust.report import check_output_file, check_output_folder
    from recipes import parse_seeds
    seeds = parse_seeds(ns.seeds)
    # every output checked before any run is loaded or trained: the tables file's folder, the jobs folder,
    # and with --run-missing the runs root
    out = check_output_file(Path(ns.out), "--out") if ns.out else check_output_file(
        Path(ns.runs) / f"paper_tables_{ns.profile}.md", "the tables file (--out's default, in --runs)")
    if ns.emit_jobs:
        check_output_folder(ns.emit_jobs, "--emit-jobs")
    if ns.run_missing:
        check_output_folder(ns.runs, "--runs")
    cells = PROFILES[ns.profile].cells
    found = load(ns.runs, ns.profile, seeds)
    missing = missing_runs(found, ns.profile, seeds)
    if ns.run_missing and missing:
        for cell, seed in missing:
            run_cells([cell], ns.profile, ns.runs, {"resume": True}, seeds=(seed,))
        found = load(ns.runs, ns.profile, seeds)
        missing = missing_runs(found, ns.profile, seeds)
    text = tables(found, ns.profile)
    tested = tested_claims(found, ns.profile, ns.runs)
    if tested:
        text += "\n" + tested
    out.write_text(text + "\n")
    values = write_values(found, out.with_suffix(""))
    plot = pareto_plot(found, out.with_name(out.stem + "_pareto.png"))
    print(text)
    n_runs = sum(len(cell_seeds(ns.profile, c, seeds)) for c in cells)
    print(f"\n{len(found)} of {len(cells)} cells present ({n_runs - len(missing)} of {n_runs} runs); tables written "
          f"to {out}, every seed's values to {', '.join(str(v) for v in values)}" + (f", plot {plot}" if plot else ""))
    if missing:
        print("missing runs:")
        for c, seed in missing:
            print("  " + launch_line(c, ns.profile, ns.runs, ns.nproc_per_node, ns.nnodes, ns.rdzv_port, seed))
    if ns.emit_jobs:
        for path in emit_jobs(missing, ns.profile, ns.runs, Path(ns.emit_jobs), ns.nproc_per_node, ns.nnodes,
                              ns.time, ns.rdzv_port):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
