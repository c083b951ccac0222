"""Command line: ``fastrobust {train,eval,data,bench}``.

Every ``TrainConfig`` field is a ``train`` flag (``--lambda-norm mean``); evaluation fields take an
``--eval-`` prefix (``--eval-aa-samples 500``). Tuples are comma-separated, optional values accept
``none``. ``train --dry-run`` validates the configuration and prints it as JSON without training.
Bad input ends with one clear line and exit status 2, never a traceback; a run stopped by SIGTERM
exits with 143 after writing a checkpoint (``--resume`` continues it).

Under ``torchrun`` (``torchrun --nproc_per_node N -m fastrobust train ...``) ``train`` and ``eval``
run distributed without any other change: see README "Scaling out".
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import EvalConfig, TrainConfig
from .errors import ConfigError, FastRobustError


def _field_parser(tp: Any, name: str):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        inner = _field_parser(args[0], name)
        return lambda s: None if s.lower() == "none" else inner(s)
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        conv = _field_parser(elem, name)
        return lambda s: tuple(conv(v) for v in s.split(",") if v.strip())
    if tp in (int, float, str):
        def convert(s: str, tp=tp):
            try:
                return tp(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{name} expects {tp.__name__}, got {s!r}") from None
        return convert
    if optional:
        return lambda s: None if s.lower() == "none" else s
    return str


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_config_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Sequence[str] = ()) -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        tp = hints[f.name]
        if tp is bool or tp == (bool | None):
            parser.add_argument(flag, dest=prefix.replace("-", "_") + f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=_field_parser(tp, f.name),
                                default=argparse.SUPPRESS, metavar=f.name.upper())


def config_from_args(ns: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    cfg = base or TrainConfig()
    values = vars(ns)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    eval_fields = {f.name for f in dataclasses.fields(EvalConfig)}
    updates = {k: v for k, v in values.items() if k in train_fields and k != "eval"}
    eval_updates = {k[len("eval_"):]: v for k, v in values.items() if k.startswith("eval_") and k[len("eval_"):] in eval_fields}
    cfg = dataclasses.replace(cfg, **updates)
    cfg.eval = dataclasses.replace(cfg.eval, **eval_updates)
    return cfg


def add_train_flags(p_train: argparse.ArgumentParser) -> None:
    add_config_flags(p_train, TrainConfig)
    add_config_flags(p_train, EvalConfig, prefix="eval-", skip=("dataset",))
    p_train.add_argument("--dry-run", action="store_true",
                         help="validate the configuration, print it as JSON and exit (no data is loaded)")


def parse_train_config(argv: Sequence[str]) -> TrainConfig:
    """``fastrobust train`` flags -> a validated TrainConfig. Raises ConfigError for a bad value and
    SystemExit(2) (argparse, with a usage message) for a malformed command line."""
    parser = argparse.ArgumentParser(prog="fastrobust train")
    add_train_flags(parser)
    return config_from_args(parser.parse_args(list(argv))).validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrobust", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="adversarial training (any method, model, dataset)")
    add_train_flags(p_train)

    p_eval = sub.add_parser("eval", help="robustness evaluation of a checkpoint: NA, FGSM, PGD, AutoAttack")
    p_eval.add_argument("--checkpoint", required=True, help="a .pt file written by fastrobust")
    p_eval.add_argument("--dataset", default=None, help="defaults to the checkpoint's training dataset")
    p_eval.add_argument("--model", default=None, help="assert the checkpoint holds this architecture")
    p_eval.add_argument("--num-classes", type=int, default=None, help="assert the checkpoint's class count")
    p_eval.add_argument("--data-dir", default=None)
    p_eval.add_argument("--device", default="auto")
    p_eval.add_argument("--out", default=None, help="folder for results.{md,csv,json} (default: beside the checkpoint)")
    p_eval.add_argument("--weights", choices=("model", "ema"), default="model")
    p_eval.add_argument("--no-progress", action="store_true")
    add_config_flags(p_eval, EvalConfig, skip=("dataset",))

    p_data = sub.add_parser("data", help="dataset utilities")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_write = data_sub.add_parser("write", help="write FFCV .beton files")
    p_write.add_argument("--dataset", required=True)
    p_write.add_argument("--split", required=True, choices=("train", "test"))
    p_write.add_argument("--out", required=True)
    p_write.add_argument("--data-dir", default=None)
    p_write.add_argument("--limit", type=int, default=None)

    p_bench = sub.add_parser("bench", help="benchmarks: kernels, loaders, step")
    bench_sub = p_bench.add_subparsers(dest="bench_command", required=True)
    b_kernels = bench_sub.add_parser("kernels", help="Triton kernels against eager and compiled references")
    b_kernels.add_argument("--device", default="cuda")
    b_kernels.add_argument("--out", default=None)
    b_loaders = bench_sub.add_parser("loaders", help="images/s per loader backend on CIFAR-10 train")
    b_loaders.add_argument("--device", default="auto")
    b_loaders.add_argument("--data-dir", default=None)
    b_loaders.add_argument("--backends", default="gpu,torch,ffcv")
    b_loaders.add_argument("--batch-size", type=int, default=128)
    b_loaders.add_argument("--out", default=None)
    b_loaders.add_argument("--step-model", default="resnet18",
                           help="model whose TRADES step consumption rate the loaders are compared with")
    from .bench import add_step_parser
    add_step_parser(bench_sub)
    return parser


def _cmd_train(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns).validate()
    if ns.dry_run:
        print(cfg.to_json())
        return 0
    from . import distributed as dist
    from .train import train
    summary = train(cfg)
    if dist.is_main():
        if "eval" in summary:
            print((Path(summary["out_dir"]) / "results.md").read_text())
        print((Path(summary["out_dir"]) / "throughput.md").read_text())
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    import loaders

    from . import distributed as dist
    from .checkpoint import load_checkpoint, load_model
    from .evaluate import evaluate, results_markdown, save_results
    from .report import manifest
    from .train import _sha256, setup_device

    ev_fields = {f.name for f in dataclasses.fields(EvalConfig)}
    cfg = EvalConfig(dataset=ns.dataset or "cifar10",
                     **{k: v for k, v in vars(ns).items() if k in ev_fields and k != "dataset"})
    cfg.resolved()  # bad options fail before anything is loaded
    ckpt = load_checkpoint(ns.checkpoint)
    spec = ckpt["spec"]
    dataset = ns.dataset or (ckpt.get("config") or {}).get("dataset")
    if dataset is None:
        raise ConfigError(f"{ns.checkpoint} does not record its dataset; pass --dataset")
    expected = {}
    if ns.model:
        expected["name"] = ns.model
    if ns.num_classes:
        expected["num_classes"] = ns.num_classes
    data = loaders.load_arrays(dataset, "test", ns.data_dir)
    from .models import DATASET_STATS
    if dataset in DATASET_STATS:
        _, _, chans, size, classes = DATASET_STATS[dataset]
        expected.setdefault("num_classes", data.num_classes)
        expected.update(in_chans=chans, img_size=size)
    device = setup_device(ns.device)
    model, _ = load_model(ns.checkpoint, device, expected=expected, weights=ns.weights)
    cfg = dataclasses.replace(cfg, dataset=dataset)
    # under torchrun every rank attacks its share of the batches; the result is the single-process one
    result = evaluate(model, data.images, data.labels, cfg, device, progress=not ns.no_progress)
    name = f"{spec['name']} ({Path(ns.checkpoint).name})"
    out = Path(ns.out) if ns.out else Path(ns.checkpoint).resolve().parent.parent / "eval"
    if dist.is_main():
        save_results({name: result}, out, manifest(dataclasses.asdict(cfg.resolved()), device=device, seed=cfg.seed,
                                                   checkpoint=str(ns.checkpoint), checkpoint_sha256=_sha256(Path(ns.checkpoint)),
                                                   samples={"n": result.n, **result.n_attacked},
                                                   world_size=dist.world_size()))
        print(results_markdown({name: result}))
        print(f"written to {out}/results.{{md,csv,json}}")
    dist.barrier()
    return 0


def _cmd_data(ns: argparse.Namespace) -> int:
    from loaders import write_beton
    path = write_beton(ns.dataset, ns.split, ns.out, data_dir=ns.data_dir, limit=ns.limit)
    print(path)
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    from .report import atomic_write_text, write_json
    if ns.bench_command == "kernels":
        from kernels import bench
        rows = bench.run(device=ns.device)
        text = bench.format_markdown(rows) if rows else ""
    elif ns.bench_command == "loaders":
        from .bench import loader_report
        rows, text = loader_report(ns)
    elif ns.bench_command == "step":
        from .bench import step_command
        _, text = step_command(ns)
        print(text)
        print(f"written to {ns.out}/bench_step.{{json,md}}")
        return 0
    else:
        raise ConfigError(f"unknown benchmark {ns.bench_command!r}")
    if text:
        print(text)
    if ns.out and rows:
        write_json(Path(ns.out) / f"bench_{ns.bench_command}.json", rows)
        atomic_write_text(Path(ns.out) / f"bench_{ns.bench_command}.md", text + "\n")
    return 0


def one_line(message: object) -> str:
    """A multi-line message (a list of paths tried, say) folded onto one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_reporting_errors(run: Callable[[], int], prog: str = "fastrobust") -> int:
    """Run a command; a user-facing error becomes one line on stderr and an exit status, never a
    traceback (2: bad input, the signal's status when interrupted). The process group is shut down."""
    from . import distributed as dist
    from .train import TrainingInterrupted
    try:
        return run()
    except TrainingInterrupted as e:
        print(f"{prog}: interrupted: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except FastRobustError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "data": _cmd_data, "bench": _cmd_bench}
    return run_reporting_errors(lambda: handlers[ns.command](ns))


if __name__ == "__main__":
    sys.exit(main())
