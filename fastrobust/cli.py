"""Command line: ``fastrobust {train,eval,data,bench,check-gpu,compare}``.

Every flag of ``train`` comes from a config field (``--weight-decay``), a method option (``--dtrades-alpha``)
or an evaluation field (``--eval-aa-samples``), its help, default and valid names from the field's metadata,
so the flags never drift from the config. Bad input ends with one line and status 2 (see README).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import select
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import kernels
import loaders

from . import bench, check_gpu
from . import distributed as dist
from .attacks import PGD
from .config import EvalConfig, TrainConfig, training_radius
from .errors import ConfigError, FastRobustError, TrainingInterrupted, unknown_name
from .methods import METHODS
from .models import NORMALIZATIONS, list_models
from .options import base_type, help_text
from .report import check_output_folder, manifest, results_markdown, save_results, sha256


def _number(tp: type, name: str) -> Callable[[str], Any]:
    def convert(s: str) -> Any:
        try:
            if tp is float and "/" in s:
                num, den = s.split("/", 1)
                return float(num) / float(den)
            return tp(s)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"--{name} expects {'an integer' if tp is int else 'a number'}, "
                                             f"got {s!r}") from None
    return convert


def _parser_for(tp: Any, name: str) -> Callable[[str], Any]:
    inner, optional = base_type(tp)
    if typing.get_origin(inner) is tuple:
        elem = _parser_for(typing.get_args(inner)[0], name)
        conv = lambda s: tuple(elem(v) for v in s.split(",") if v.strip())  # noqa: E731
    elif inner in (int, float):
        conv = _number(inner, name)
    else:
        conv = str
    return (lambda s: None if s.strip().lower() == "none" else conv(s)) if optional else conv


def add_fields(parser: argparse._ActionsContainer, cls: type, prefix: str = "", skip: Sequence[str] = (),
               aliases: dict[str, str] | None = None, defaults: Any = None) -> None:
    """One flag per field (dataclass-typed fields aside): ``--{prefix}{field}`` (and ``aliases[dest]``), stored
    as ``{prefix}{field}``, given or absent (no default); ``defaults``: the instance whose values the help shows."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            continue
        dest = prefix + f.name
        flags = ["--" + dest.replace("_", "-")] + ([aliases[dest]] if aliases and dest in aliases else [])
        kind = ({"action": argparse.BooleanOptionalAction} if base_type(tp)[0] is bool else
                {"type": _parser_for(tp, dest.replace("_", "-")), "metavar": f.name.upper()})
        parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, **kind,
                            help=help_text(f, getattr(defaults, f.name) if defaults is not None else dataclasses.MISSING))


def given_fields(values: dict[str, Any], cls: type, prefix: str = "", skip: Sequence[str] = ()) -> dict[str, Any]:
    """The given ``{prefix}{field}`` values of ``cls``'s fields (see :func:`add_fields`), by field name."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix) and k[len(prefix):] in names}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    add_fields(parser, TrainConfig)   # its method, attack and eval fields: the flags below
    parser.add_argument("--method", default=argparse.SUPPRESS, metavar="NAME",
                        help=f"training method; one of {', '.join(sorted(METHODS))}; default: trades")
    for name, cls in sorted(METHODS.items()):
        if dataclasses.fields(cls):
            add_fields(parser.add_argument_group(f"{name} options (with --method {name})"), cls, prefix=f"{name}_")
    # short spellings of the training attack's radius and threat model (the flags every protocol sets)
    add_fields(parser.add_argument_group("training attack (PGD)"), PGD, prefix="attack_",
               aliases={"attack_eps": "--eps", "attack_norm": "--norm"}, defaults=TrainConfig().attack)
    add_fields(parser.add_argument_group("evaluation options"), EvalConfig, prefix="eval_", skip=("dataset",))
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the configuration, print it as JSON and exit (no data is loaded)")


def config_from_args(ns: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The flags of ``ns`` over ``base`` (default: TrainConfig()); not validated."""
    values = vars(ns)
    cfg = dataclasses.replace(base or TrainConfig(), **given_fields(values, TrainConfig, skip=("eval", "method", "attack")))
    cfg.attack = dataclasses.replace(cfg.attack, **given_fields(values, PGD, "attack_"))
    cfg.eval = dataclasses.replace(cfg.eval, **given_fields(values, EvalConfig, "eval_"))
    name = values.get("method", cfg.method.name)
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    for other, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            if other != name and f"{other}_{f.name}" in values:
                raise ConfigError(f"--{other}-{f.name.replace('_', '-')} is an option of method {other}, but the "
                                  f"method is {name}: drop it or pass --method {other}.")
    options = given_fields(values, METHODS[name], f"{name}_")
    keep = dataclasses.asdict(cfg.method) if cfg.method.name == name else {}
    cfg.method = METHODS[name](**{**keep, **options})
    return cfg


DATA_DIR_HELP = "dataset root (default: $FASTROBUST_DATA, else ./data)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrobust", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_flags(sub.add_parser("train", help="adversarial training (any method, model, dataset)"))

    p_eval = sub.add_parser("eval", help="robustness evaluation of a checkpoint, a plain state dict or a RobustBench "
                                         "zoo model: NA, FGSM, PGD, AutoAttack, with sanity checks")
    p_eval.add_argument("--checkpoint", help="a .pt file: a fastrobust checkpoint, or a plain state dict (with "
                        "--model; official TRADES/MART layouts are mapped); required unless --robustbench names the model")
    p_eval.add_argument("--robustbench", metavar="NAME", help="instead of --checkpoint: a RobustBench zoo model (e.g. "
                        "Wong2020Fast) for --dataset and --norm, its weights read from --robustbench-dir (needs "
                        "robustbench: pip install 'fastrobust[robustbench]'; nothing is downloaded)")
    p_eval.add_argument("--robustbench-dir", metavar="DIR",
                        help="RobustBench's model_dir, holding DATASET/THREAT_MODEL/NAME.pt; default: ./models")
    p_eval.add_argument("--export-robustbench", metavar="FILE.json", help="also write the evaluation as a RobustBench "
                        "model_info entry (needs autoattack in --attacks and --aa-samples > 0)")
    p_eval.add_argument("--dataset", help="test set (default: the checkpoint's training dataset; cifar10 for a state dict)")
    p_eval.add_argument("--model", help=f"architecture: checked against a fastrobust checkpoint, required for a state "
                        f"dict; one of {', '.join(list_models())}")
    p_eval.add_argument("--num-classes", type=int, help="class count (default: the dataset's)")
    p_eval.add_argument("--input-normalization", choices=sorted(NORMALIZATIONS), help="for a state dict: the "
                        "normalisation the model expects inside it (none: raw [0, 1] inputs, as the official TRADES and "
                        "MART models); default: the dataset's")
    p_eval.add_argument("--data-dir", help=DATA_DIR_HELP)
    p_eval.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; default: auto")
    p_eval.add_argument("--out", help="folder for results.{md,csv,json} (default: the run's eval/ folder for a run's "
                        "checkpoint, else eval/ beside the file)")
    p_eval.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="which weights of a fastrobust checkpoint; default: model")
    p_eval.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_fields(p_eval, EvalConfig, skip=("dataset",))

    data_sub = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command", required=True)
    p_write = data_sub.add_parser("write", help="write an FFCV .beton file")
    p_write.add_argument("--dataset", required=True, help="cifar10 or mnist")
    p_write.add_argument("--split", required=True, choices=("train", "test"), help="which split")
    p_write.add_argument("--out", required=True, help="folder for the .beton")
    p_write.add_argument("--data-dir", help=DATA_DIR_HELP)
    p_write.add_argument("--limit", type=int, help="first n images only; default: all")

    bench.add_bench_parsers(sub.add_parser("bench", help="benchmarks: step, kernels, loaders"))
    check_gpu.add_parser(sub)
    add_compare_parser(sub)
    return parser


def _cmd_train(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns).validate()
    if ns.dry_run:
        print(cfg.to_json())
        return 0
    from .train import train
    summary = train(cfg)
    if dist.is_main():
        if "eval" in summary:
            print((Path(summary["out_dir"]) / "results.md").read_text())
        print((Path(summary["out_dir"]) / "throughput.md").read_text())
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    from . import zoo   # robustbench itself is imported only for --robustbench
    from .evaluate import evaluate
    cfg = EvalConfig(**given_fields(vars(ns), EvalConfig, skip=("dataset",))).validate()
    out = check_output_folder(ns.out, "--out") if ns.out else None   # before anything is read or evaluated
    export = zoo.check_export(cfg, ns.export_robustbench) if ns.export_robustbench else None
    if ns.robustbench_dir is not None and not ns.robustbench:
        raise ConfigError("--robustbench-dir is the folder of --robustbench's weights: pass --robustbench NAME too.")
    if ns.robustbench:
        given = [flag for flag in ("--checkpoint", "--model", "--num-classes", "--input-normalization")
                 if getattr(ns, flag[2:].replace("-", "_")) is not None]
        if given or ns.weights != "model":
            raise ConfigError(f"--robustbench {ns.robustbench} names the model, with its own architecture, classes, "
                              f"normalisation and weights: drop {', '.join(given or ['--weights'])}.")
        dataset = ns.dataset or "cifar10"
        zoo_model = zoo.load(ns.robustbench, dataset, cfg.norm, ns.robustbench_dir)   # bad names and files fail here
        out = out or check_output_folder(zoo.default_out(ns.robustbench, dataset, zoo_model.threat_model),
                                         "the evaluation folder (--out's default)")
        model, train_eps, name, weights = zoo_model.module, None, zoo_model.label, zoo_model.path
        spec_name = type(model).__name__
    elif not ns.checkpoint:
        raise ConfigError("eval needs a model: --checkpoint FILE (a fastrobust checkpoint or a state dict) or "
                          "--robustbench NAME (a RobustBench zoo model).")
    else:
        model, train_eps, spec_name, dataset, out = _model_of_checkpoint(ns, out)
        name, weights = f"{spec_name} ({Path(ns.checkpoint).name})", ns.checkpoint
    cfg = dataclasses.replace(cfg, dataset=dataset).resolved(train_eps)
    data = loaders.load_arrays(dataset, "test", ns.data_dir)
    device = dist.resolve_device(ns.device)
    # under torchrun every rank attacks its share of the batches; the result is the single-process one
    result = evaluate(model.to(device), data.images, data.labels, cfg, device, progress=not ns.no_progress)
    if dist.is_main():
        digest = sha256(weights)
        extra = {"robustbench": zoo_model.manifest(digest)} if ns.robustbench else {}
        paths = save_results({name: result}, out, manifest(
            dataclasses.asdict(cfg), device=device, seed=cfg.seed, checkpoint=str(weights), checkpoint_sha256=digest,
            samples={"n": result.n, **result.n_attacked}, world_size=dist.world_size(), **extra))
        print(results_markdown({name: result}))
        print(f"written to {out}/results.{{md,csv,json}}")
        if export is not None:
            zoo.export(export, result, spec_name, model=name, robustbench_model=ns.robustbench, results=paths["json"],
                       points=paths.get(f"points:{name}"))
            print(f"RobustBench entry written to {export}")
    dist.barrier()
    return 0


def _model_of_checkpoint(ns: argparse.Namespace, out: Path | None) -> tuple[Any, float | None, str, str, Path]:
    """The model of ``--checkpoint`` (a fastrobust checkpoint or a plain state dict), its training radius,
    name and dataset, and the output folder (checked)."""
    from . import checkpoint as ck
    from .models import create_model
    obj = ck.read(ns.checkpoint)   # bad files fail here, before any data is loaded
    if out is None:   # the default is beside the checkpoint: checked once the checkpoint is known to exist
        out = check_output_folder(default_eval_dir(ns.checkpoint), "the evaluation folder (--out's default)")
    is_ours = isinstance(obj, dict) and str(obj.get("format", "")).startswith(ck.FORMAT_NAME)
    if not is_ours and ck.state_dict_in(obj) is not None:
        if not ns.model:
            raise ConfigError(f"{ns.checkpoint} holds a plain state dict with no model spec: pass --model NAME (one of "
                              f"{', '.join(list_models())}), --dataset, and --input-normalization if needed.")
        if ns.weights != "model":
            raise ConfigError(f"--weights {ns.weights} is for fastrobust checkpoints; {ns.checkpoint} is a plain state "
                              f"dict, with one set of weights: drop the flag.")
        dataset = ns.dataset or "cifar10"
        model = create_model(ns.model, dataset=dataset, num_classes=ns.num_classes, normalization=ns.input_normalization)
        layout = ck.load_state_dict(ck.state_dict_in(obj), model, ns.checkpoint)
        train_eps, spec_name = None, f"{ns.model} (state dict, {layout} layout)"
    else:
        ckpt = ck.check_format(obj, ns.checkpoint)
        if ns.input_normalization is not None:   # silently ignoring it would evaluate another model than asked
            raise ConfigError(f"--input-normalization is for plain state dicts; {ns.checkpoint} is a fastrobust "
                              f"checkpoint, whose model records its own normalisation: drop the flag.")
        dataset = ns.dataset or (ckpt.get("config") or {}).get("dataset")
        if dataset is None:
            raise ConfigError(f"{ns.checkpoint} does not record its dataset; pass --dataset")
        info = loaders.dataset_info(dataset)
        expected = {"num_classes": ns.num_classes or info.num_classes, "in_chans": info.channels,
                    "img_size": info.size, **({"name": ns.model} if ns.model else {})}
        model, _ = ck.load_model(ns.checkpoint, expected=expected, weights=ns.weights, ckpt=ckpt)
        train_eps, spec_name = training_radius(ckpt.get("config") or {}), ckpt["spec"]["name"]
    return model, train_eps, spec_name, dataset, out


def default_eval_dir(checkpoint: str | Path) -> Path:
    """runs/<name>/eval for a run's runs/<name>/checkpoints/*.pt, else an eval/ folder beside the file (a
    downloaded state dict's folder's parent may be anything, even unwritable)."""
    folder = Path(checkpoint).resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "eval"


COMPARE_USAGE = """\
Two evaluations of the same test points:
  fastrobust compare A B
    A, B: run or evaluation folders (each holding one points.npz) or points.npz files. For NA and each
    attack both hold: n, both accuracies, A - B in points, its paired bootstrap interval, and the exact
    McNemar p. Different points, radius, threat model or attack settings stop it, naming each difference.
Two groups of runs, one run folder per training seed (the seed is read from the run's manifest.json):
  fastrobust compare --a A_SEED0 A_SEED1 A_SEED2 --b B_SEED0 B_SEED1 B_SEED2
    For NA and each attack: the mean difference over seeds with its t-interval and p (paired by seed when
    both groups hold the same seeds, else Welch's), and each seed's accuracies beside its paired test.
    With one run per group there is no interval over seeds: only the per-point test is given.
Markdown goes to stdout; --out DIR also writes compare.md, compare.csv and compare.json."""


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="is a difference real? paired tests of two evaluations, or of two groups of "
                                       "training seeds", description=COMPARE_USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evaluations", nargs="*", metavar="EVAL",
                   help="the two evaluations A and B: run or evaluation folders, or points.npz files")
    for group in "ab":
        p.add_argument(f"--{group}", dest=f"group_{group}", nargs="+", metavar="RUN",
                       help=f"group {group.upper()}: run folders, one per training seed")
    p.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"),
                   help="what A and B are, for the tables (e.g. D-TRADES TRADES); default: A B")
    for flag, tp, default, what in (("reps", int, 10_000, "bootstrap replicates of each paired interval"),
                                    ("seed", int, 0, "seed of the bootstrap resampling"),
                                    ("level", float, 0.95, "confidence level of every interval, in (0, 1)")):
        p.add_argument(f"--{flag}", type=_number(tp, flag), default=default, help=f"{what}; default: {default}")
    p.add_argument("--out", metavar="DIR", help="also write compare.{md,csv,json} into this folder")


def _cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import compare_groups, compare_pair, write_comparison
    test = {"reps": ns.reps, "seed": ns.seed, "level": ns.level}
    if ns.group_a or ns.group_b:
        if ns.evaluations or not (ns.group_a and ns.group_b):
            raise ConfigError("a group comparison takes --a RUN [RUN ...] and --b RUN [RUN ...] and no other paths; "
                              "two evaluations are compared with: fastrobust compare A B")
        result = compare_groups(ns.group_a, ns.group_b, ns.names, **test)
    elif len(ns.evaluations) == 2:
        result = compare_pair(*ns.evaluations, ns.names, **test)
    else:
        raise ConfigError(f"compare takes two evaluations (fastrobust compare A B) or two groups of run folders "
                          f"(fastrobust compare --a RUN ... --b RUN ...); got {len(ns.evaluations)} path(s).")
    if ns.out:
        write_comparison(result, ns.out)
    print(result.markdown())
    if ns.out:
        print(f"written to {ns.out}/compare.{{md,csv,json}}")
    return 0


def _cmd_data(ns: argparse.Namespace) -> int:
    check_output_folder(ns.out, "--out")
    print(loaders.write_beton(ns.dataset, ns.split, ns.out, data_dir=ns.data_dir, limit=ns.limit))
    return 0


def one_line(message: object) -> str:
    """A multi-line message (a list of paths tried, say) folded onto one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_reporting_errors(run: Callable[[], int], prog: str = "fastrobust") -> int:
    """Run a command; a user-facing error becomes one line on stderr and an exit status, never a
    traceback (2: bad input, the signal's status when interrupted). The process group is shut down."""
    try:
        return run()
    except TrainingInterrupted as e:
        print(f"{prog}: interrupted: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (FastRobustError, kernels.KernelCheckError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


BROKEN_PIPE_EXIT = 141   # 128 + SIGPIPE: what a shell reports for a program whose reader went away


def _stdout_is_broken() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on its writing end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no poll, or no real stdout: trust the error
        return True


def exit_quietly_on_broken_pipe(run: Callable[[], int]) -> int:
    """Run a command (argument parsing included) whose stdout may close early (``| head``): the rest of the
    output is dropped, with no traceback, and the status is 141 as under SIGPIPE, so that ``set -o pipefail``
    sees the output was cut short. A BrokenPipeError from anything but stdout is raised."""
    try:
        try:
            return run()
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()   # buffered output: a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        if not _stdout_is_broken():
            raise
        # Python flushes stdout once more at exit: it goes to /dev/null, so that cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    def parse_and_run() -> int:
        ns = build_parser().parse_args(argv)
        handlers = {"train": _cmd_train, "eval": _cmd_eval, "data": _cmd_data, "bench": bench.run_bench,
                    "check-gpu": check_gpu.run, "compare": _cmd_compare}
        return run_reporting_errors(lambda: handlers[ns.command](ns))
    return exit_quietly_on_broken_pipe(parse_and_run)


if __name__ == "__main__":
    sys.exit(main())
