"""``python -m recipes.robustbench_speed --model NAME --n N``: time fastrobust's evaluation of a RobustBench zoo
model against RobustBench's own ``robustbench.eval.benchmark()``, on the same model and the same test points.

fastrobust runs its default evaluation (FGSM, PGD-20, AutoAttack standard on every point, the eps sweep and
every sanity check); benchmark() runs clean accuracy and AutoAttack standard. Both are timed in wall-clock
and process CPU seconds (all threads). Not a test: a measurement, printed as a table.

Offline by construction: benchmark() would download CIFAR-10, so its dataset loader is replaced by one that
returns the same test points fastrobust evaluates (the output says so), and the model it gets was loaded by
robustbench.utils.load_model from a folder that holds the weight file already (no download). With
``--random-init`` and no weight file, the architecture's seeded random weights are saved there first: such a
model misclassifies most clean points, so AutoAttack, which only attacks clean-correct points, has little to
do; the clean accuracy is printed beside the speeds for that reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import loaders
from fastrobust import checkpoint as ck
from fastrobust import zoo
from fastrobust.config import EvalConfig
from fastrobust.evaluate import as_float_images, evaluate
from fastrobust.report import device_description, markdown_table


def _timed(run: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _patch_benchmark(x: torch.Tensor, y: torch.Tensor) -> Any:
    """robustbench.eval with its test set replaced by (x, y), and its AutoAttack calls mapped onto
    pyautoattack (robustbench 1.1.1 calls the API of the authors' repository: ``log_path=``, ``bs=``, one return
    value; pyautoattack packages the same attacks with ``batch_size=`` and returns a pair)."""
    import pyautoattack
    import robustbench.eval as rb_eval

    class AutoAttack(pyautoattack.AutoAttack):
        def __init__(self, model, norm="Linf", eps=8 / 255, version="standard", device="cpu", log_path=None,
                     seed=0):
            super().__init__(model, norm=norm, eps=eps, version=version, device=device, seed=seed)

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, state_path=None):
            return super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)[0]

    rb_eval.load_clean_dataset = lambda dataset, n_examples, data_dir, prepr: (x[:n_examples], y[:n_examples])
    rb_eval.AutoAttack = AutoAttack
    return rb_eval


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="robustbench-models-") as scratch:
        return _measure(argv, Path(scratch))


def _measure(argv: list[str] | None, scratch: Path) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.robustbench_speed", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Wong2020Fast", help="RobustBench cifar10 model name; default: Wong2020Fast")
    p.add_argument("--n", type=int, default=32, help="test points (AutoAttack on all of them); default: 32")
    p.add_argument("--norm", default="linf", choices=sorted(zoo.THREAT_MODELS), help="threat model; default: linf")
    p.add_argument("--eps", type=float, default=8 / 255, help="radius; default: 8/255")
    p.add_argument("--batch-size", type=int, default=32, help="both tools' batch size; default: 32")
    p.add_argument("--robustbench-dir", default=zoo.DEFAULT_DIR, help="RobustBench's model_dir; default: ./models")
    p.add_argument("--random-init", action="store_true",
                   help="without a weight file: save the architecture's seeded random weights in a temporary model_dir")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $FASTROBUST_DATA, else ./data)")
    ns = p.parse_args(argv)
    model_dicts, BenchmarkDataset, ThreatModel = zoo.registry()
    threat, model_dir, note = zoo.THREAT_MODELS[ns.norm], Path(ns.robustbench_dir), "trained weights"
    if ns.random_init and not (model_dir / "cifar10" / threat / f"{ns.model}.pt").is_file():
        model_dir = scratch
        torch.manual_seed(0)
        with zoo.offline():
            module = model_dicts[BenchmarkDataset("cifar10")][ThreatModel(threat)][ns.model]["model"]()
        ck.atomic_save(module.state_dict(), model_dir / "cifar10" / threat / f"{ns.model}.pt")
        note = "RANDOM-INIT weights (seed 0), saved in a temporary model_dir for both tools"
    data = loaders.load_arrays("cifar10", "test", ns.data_dir)
    x, y = as_float_images(data.images[:ns.n]), torch.from_numpy(data.labels[:ns.n].copy()).long()

    ours = zoo.load(ns.model, "cifar10", ns.norm, model_dir).module
    cfg = EvalConfig(dataset="cifar10", eps=ns.eps, norm=ns.norm, num_samples=ns.n, aa_samples=ns.n,
                     batch_size=ns.batch_size)
    with torch.no_grad():   # one-time start-up costs (allocator, kernels) are not either tool's
        ours(x[:ns.batch_size])
    result, fr_wall, fr_cpu = _timed(lambda: evaluate(ours, x, y, cfg, "cpu", progress=False))
    aa_cfg = dataclasses.replace(cfg, attacks=("autoattack",), sweep_samples=0)   # the same work as benchmark()
    aa_only, aa_wall, aa_cpu = _timed(lambda: evaluate(ours, x, y, aa_cfg, "cpu", progress=False))

    from robustbench.utils import load_model
    rb_eval = _patch_benchmark(x, y)
    with zoo.offline():   # the weight file is there: load_model must not need the network
        theirs = load_model(ns.model, model_dir=str(model_dir), dataset="cifar10", threat_model=threat)
    (rb_clean, rb_aa), rb_wall, rb_cpu = _timed(lambda: rb_eval.benchmark(
        theirs, n_examples=ns.n, dataset="cifar10", threat_model=threat, data_dir=str(model_dir / "no-data"),
        device=torch.device("cpu"), batch_size=ns.batch_size, eps=ns.eps))

    checks = f"{sum(c.passed for c in result.checks)}/{len(result.checks)} sanity checks passed"
    rows = [["fastrobust eval (FGSM, PGD-20, AutoAttack standard, eps sweep, checks)", 100 * result.na,
             100 * result.ra["autoattack"], fr_wall, fr_cpu, ns.n / fr_wall],
            ["fastrobust eval --attacks autoattack --sweep-samples 0", 100 * aa_only.na, 100 * aa_only.ra["autoattack"],
             aa_wall, aa_cpu, ns.n / aa_wall],
            ["robustbench.eval.benchmark (clean, AutoAttack standard)", 100 * rb_clean, 100 * rb_aa, rb_wall, rb_cpu,
             ns.n / rb_wall]]
    print(f"{ns.model} (cifar10 {threat}, eps {ns.eps:.5g}) on the first {ns.n} CIFAR-10 test points; {note}.")
    print("benchmark()'s dataset loader was replaced by these same points (it would download CIFAR-10); its model "
          "came from robustbench.utils.load_model on the local weight file.")
    print(f"device: {device_description('cpu')}\n")
    print(markdown_table(["evaluation", "clean acc %", "AutoAttack acc %", "wall s", "CPU s", "points/s"], rows))
    print(f"\nwall-time ratio to benchmark(): fastrobust's full evaluation {fr_wall / rb_wall:.2f}x ({checks}; "
          f"benchmark() runs none), fastrobust's AutoAttack alone {aa_wall / rb_wall:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
