"""DDP on the CPU (gloo, 2 processes started by torchrun): the same training math and exactly the same
evaluation as a single process, SIGTERM agreement across ranks, and exact resume.

What "the same" means for training. A DDP step and a single-process step from the same state on the
same global batch differ in how the work is split: each rank computes 32 samples where one process
computes 64, and each rank reduces its half of the gradient before the all-reduce adds the halves
(gloo's order), where one process sums the whole batch in one kernel. With the same number of torch
threads (one, below), each sample's forward and backward do not depend on the batch size, so every
per-sample quantity (attack start, attack, sensitivity, entropy, KL, the globally normalised lambda,
FAAL's all-reduced class weights) is bitwise equal and the weights after a step differ only by the
rounding of the gradient sums. The thread count matters: a GEMM split over 2 threads sums in another
order (SmallCNN's fc1 gives other last bits at 1 and 2 threads; this made the step comparison fail on
an AVX-512 machine with ~8e-3 of the update when the reference ran with 2 threads), and the TRADES
family's L-inf attack turns last bits into whole steps: it starts 0.001 away from x, where its gradient
is a difference of two nearly equal softmaxes, and takes sign() of it. So the references run with the
ranks' thread count, and the training attack here is L2 (its step g/||g|| is continuous in the
gradient): should a CPU's kernels ever give a sample other last bits in another batch size, the
difference stays small instead of flipping signs.

Free-running multi-step trajectories are *not* compared; instead each DDP step is checked against one
single-process step from the DDP run's own checkpoint (which also exercises resuming a 2-process
checkpoint in 1 process).
"""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import loaders
from conftest import random_smallcnn
from fastrobust import checkpoint as ck
from fastrobust import distributed as dist
from fastrobust.attacks import pgd_perturb, random_start
from fastrobust.checkpoint import load_checkpoint
from fastrobust.config import EvalConfig
from fastrobust.evaluate import evaluate
from fastrobust.methods import DTRADES, AdvBatch
from fastrobust.train import Trainer
from kernels.dispatch import triton_usable
from kernels.reference import normalize_batch
from recipes.protocols import PAPER_ROWS

REPO = Path(__file__).resolve().parents[1]
EVAL = {"eps": 0.3, "num_samples": 90, "aa_samples": 30, "sweep_samples": 40, "batch_size": 20,
        "aa_version": "custom", "aa_attacks": ("apgd-ce",), "pgd_steps": 3, "pgd_step_size": 0.1,
        "sweep_multipliers": (0.0, 0.5, 1.0)}
METHODS = ("dtrades", "faal")
VAL = 40   # held-out training images: the last 40 of the training split
RANK_THREADS = 1   # torch threads per rank (OMP_NUM_THREADS), and of every single-process reference here


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(RANK_THREADS))
    return env


@contextlib.contextmanager
def _rank_threads():
    """Compute single-process references with the ranks' thread count: a GEMM's reduction order depends
    on how many threads split it (SmallCNN's fc1 gives other last bits at 1 and 2 threads), while at a
    fixed thread count each sample's forward and backward do not depend on the batch size."""
    before = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _overrides(data_dir, init, method, **extra) -> dict:
    """4 steps of a global batch of 64 (32 per rank) with an L2 training attack of radius 2 (2 steps of
    1.0: it covers the ball); dropout off: masks could not match across layouts. D-TRADES normalises
    lambda over the global batch (sync="global"), as one process does."""
    values = dict(train_limit=256, batch_size=64, epochs=1, norm="l2", eps=2.0, attack_steps=2, attack_step_size=1.0,
                  val_samples=VAL, dropout=0.0, init_checkpoint=str(init), ckpt_every_steps=1, progress=False,
                  data_dir=str(data_dir), eval=EVAL)
    if method == "dtrades":
        values["method"] = dataclasses.replace(PAPER_ROWS["dtrades"], sync="global").to_dict()
    values.update(extra)
    return values


def _set_args(values: dict) -> list[str]:
    return ["--set"] + [f"{k}={v!r}" for k, v in values.items()]


def _torchrun(args, nproc=2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """A SmallCNN with a random last layer (the default zero one makes every prediction uniform, and
    min-max normalising a constant entropy is ill-conditioned)."""
    model = random_smallcnn(0)
    path = tmp_path_factory.mktemp("init") / "init.pt"
    ck.atomic_save({"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict()}, path)
    return path


def _recipe(method, runs, values, *extra):
    return _torchrun(["-m", f"recipes.mnist_{method}_smallcnn", "--profile", "smoke", "--runs", str(runs),
                      "--data-dir", values["data_dir"], *extra, *_set_args(values)])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir, init_ckpt):
    """The smoke recipes of D-TRADES and FAAL on 2 gloo processes: 4 steps each, sharded validation and
    final evaluation (FGSM, PGD, AutoAttack APGD-CE, eps sweep). Two launches: the D-TRADES run sets a
    method option (sync), and --set cannot set one row's options under --compare."""
    runs = tmp_path_factory.mktemp("ddp")
    outs = {}
    for method in METHODS:
        proc = _recipe(method, runs, _overrides(data_dir, init_ckpt, method))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs[method] = out
    return runs, outs


def _cfg(method, data_dir, init, out_dir, **extra):
    import recipes
    return recipes.make_config("mnist", method, "smallcnn", "smoke", overrides=dict(
        _overrides(data_dir, init, method, **extra), out_dir=str(out_dir)))


def _one_step(cfg, resume_from: Path | None = None) -> dict:
    """One single-process Trainer step, from the config's initial weights or from a checkpoint."""
    trainer = Trainer(cfg)
    if resume_from is not None:
        trainer.ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(resume_from, trainer.ckpt_dir / resume_from.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "written by a run with 2 processes"
            assert trainer.restore()
    trainer.loader.set_epoch(trainer.epoch, start_batch=trainer.batch)
    x, y = next(iter(trainer.loader))
    assert trainer.step(x, y) is not None
    return trainer.model.state_dict()


@pytest.mark.parametrize("method", METHODS)
def test_a_ddp_step_equals_a_single_process_step(ddp_run, tmp_path, data_dir, init_ckpt, method):
    """Resume the 2-process run's step-3 checkpoint in one process, take one step, compare with the
    2-process run's step 4, tensor by tensor:

        ||w_single - w_ddp|| <= 1e-7 ||w|| + 1e-4 ||w_ddp - w_before||

    1e-7 of the weights is the rounding of the update's addition (float32 eps 6e-8). 1e-4 of the update
    bounds the rounding of the gradient sums (two halves all-reduced vs one sum: ~1e-7 relative, a few
    ulps more through momentum and weight decay), with 100x margin. It holds on any CPU by
    construction: same thread count, so the per-sample work agrees to a few ulps (checked first, as the
    premise), and only summation order differs (measured worst ratio ~1e-6 on AVX-512, AVX2, SSE4.1)."""
    runs, _ = ddp_run
    ckpts = runs / f"mnist_{method}_smallcnn" / "smoke" / "seed0" / "checkpoints"
    before, after = load_checkpoint(ckpts / "step-00000003.pt"), load_checkpoint(ckpts / "step-00000004.pt")
    assert before["world_size"] == 2 and len(before["rng_ranks"]) == 2
    assert before["config"]["attack"]["norm"] == "l2" and (method != "dtrades" or before["config"]["method"]["sync"] == "global")
    with _rank_threads():
        # in channels_last, as the trainer runs the model; a few ulps of the logits at most between batch
        # shapes (bitwise equal on AVX-512, AVX2 and SSE4.1 as measured), which the bound below absorbs
        probe = random_smallcnn(0).eval().to(memory_format=torch.channels_last)
        x = torch.rand(64, 1, 28, 28).to(memory_format=torch.channels_last)
        torch.testing.assert_close(probe(x[:32]), probe(x)[:32], rtol=1e-5, atol=1e-6,
                                   msg="premise: a sample's logits depend on the batch size here")
        single = _one_step(_cfg(method, data_dir, init_ckpt, tmp_path, resume=True), ckpts / "step-00000003.pt")
    worst = 0.0
    for k, v in after["model"].items():
        if not v.is_floating_point():
            continue
        update = float((v - before["model"][k]).norm())
        diff = float((single[k] - v).norm())
        assert diff <= 1e-7 * float(v.norm()) + 1e-4 * update, (method, k, diff, update)
        worst = max(worst, diff / max(update, 1e-30))
    print(f"\nDDPWORST {method} {worst:.3e}")
    assert worst > 0  # not bit-identical: the all-reduce sums in another order (if this fails, rejoice and tighten)


def test_distributed_evaluation_equals_single_process_exactly(ddp_run, mnist_test, data_dir):
    """Evaluation is sharded by whole batches with per-batch attack seeds: exact by construction (each
    batch is computed by one process, at the same size and thread count, as one process would)."""
    runs, outs = ddp_run
    run = runs / "mnist_dtrades_smallcnn" / "smoke" / "seed0"
    (ddp,) = json.loads((run / "results.json").read_text()).values()
    model, _ = ck.load_model(run / "checkpoints" / "final.pt")
    model = model.to(memory_format=torch.channels_last)   # the layout the ranks evaluated in: the same kernels
    cfg = EvalConfig(dataset="mnist", **EVAL)
    with _rank_threads():
        single = evaluate(model, mnist_test.images, mnist_test.labels, cfg, progress=False, distributed=False).to_dict()
    for key in ("n", "na", "ra", "n_attacked", "na_on_attacked", "conditional_asr", "sweep", "rd", "asr",
                "all_checks_passed"):
        assert single[key] == ddp[key], key
    assert [c["detail"] for c in single["checks"]] == [c["detail"] for c in ddp["checks"]]
    assert single["n_attacked"]["autoattack"] == 30 and len(single["sweep"]) == 4
    # the per-epoch validation ran sharded too, on the last VAL training images
    epoch = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"kind": "epoch"' in line][-1]
    held_out = loaders.load_arrays("mnist", "train", data_dir)
    with _rank_threads():
        val = evaluate(model, held_out.images[-VAL:], held_out.labels[-VAL:],
                       EvalConfig(dataset="mnist", eps=0.3, attacks=("pgd",), pgd_steps=3, pgd_step_size=0.1,
                                  aa_samples=0, sweep_samples=0, batch_size=20), progress=False, distributed=False)
    assert (epoch["val_na"], epoch["val_pgd_ra"], epoch["val_n"]) == (val.na, val.ra["pgd"], VAL)
    # rank 0 alone wrote and printed
    out = outs["dtrades"]
    assert out.count("== dtrades / smallcnn / mnist") == 1 and out.count("**Accuracy (NA and RA)**") == 1
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "per_rank_batch": 32, "backend": "gloo"}


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun started."""
    found = {}
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(child)
    return found


def test_sigterm_to_one_rank_stops_all_with_a_checkpoint_and_resume_is_exact(ddp_run, tmp_path, data_dir, init_ckpt):
    """SIGTERM reaches rank 1 only; the flag is all-reduced, so rank 0 also stops at the same step
    boundary, writes the checkpoint, and both exit with 143. The resumed 2-process run ends with
    weights bit-identical to the uninterrupted 2-process run (same world size, same reduction order)."""
    runs, _ = ddp_run
    ref = load_checkpoint(runs / "mnist_dtrades_smallcnn" / "smoke" / "seed0" / "checkpoints" / "final.pt")
    values = _overrides(data_dir, init_ckpt, "dtrades", final_eval=False)
    proc = _recipe("dtrades", tmp_path, values)
    ckpts = tmp_path / "mnist_dtrades_smallcnn" / "smoke" / "seed0" / "checkpoints"
    log = tmp_path / "mnist_dtrades_smallcnn" / "smoke" / "seed0" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and '"kind": "step"' in log.read_text()):  # step 1 done: both ranks are in the loop
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("interrupted: stopped by SIGTERM") == 1, err[-3000:]          # rank 1: its own signal
    assert err.count("interrupted: stopped by a stop signal on another rank") == 1, err[-3000:]  # rank 0
    assert not (ckpts / "final.pt").exists()
    stopped = load_checkpoint(ck.step_checkpoints(ckpts)[-1])
    assert stopped["global_step"] >= 1 and stopped["world_size"] == 2

    proc = _recipe("dtrades", tmp_path, values, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("resumed from") == 1
    final = load_checkpoint(ckpts / "final.pt")
    assert final["global_step"] == ref["global_step"] == 4
    for k, v in ref["model"].items():
        assert torch.equal(v, final["model"][k]), k
    # TensorBoard: rank 0 alone writes, one event file per start, and the curve has each logged step once
    from fastrobust import tensorboard_log
    if tensorboard_log.available():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        assert len(list(log.parent.glob("events.out.tfevents.*"))) == 2
        acc = EventAccumulator(str(log.parent))
        acc.Reload()
        logged = [json.loads(line) for line in log.read_text().splitlines()]
        assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in logged if r["kind"] == "step"]


# -- sweeps: the emitted launch lines and SLURM array ----------------------------------------------

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $* MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-} RDZV_ID=${RDZV_ID:-}" >> "$STUB_LOG"
"""


def _stub_bin(folder: Path, log: Path) -> dict:
    """srun (drops its options and runs the rest), scontrol (node list, requeue) and a torchrun that
    logs its command line and, with STUB_SLEEP, trains until SIGTERM (exit 143)."""
    folder.mkdir()
    (folder / "srun").write_text("#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    (folder / "scontrol").write_text(STUB + 'if [ "$1" = show ]; then echo node007; echo node008; fi\n')
    (folder / "torchrun").write_text(STUB + 'if [ -n "${STUB_SLEEP:-}" ]; then sleep 30 >/dev/null 2>&1 & '
                                             'trap "kill $!; exit 143" TERM; touch "$STUB_LOG.started"; wait; fi\n')
    for f in folder.iterdir():
        f.chmod(0o755)
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log),
                SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="77", SLURM_JOB_NODELIST="node[007-008]")


def test_emitted_jobs_multi_node_and_slurm_array_requeue(tmp_path):
    from recipes import paper_tables
    from recipes.protocols import PROFILES

    cells = PROFILES["paper"].cells
    assert paper_tables.main(["--runs", str(tmp_path / "runs"), "--emit-jobs", str(tmp_path / "jobs"),
                              "--nproc-per-node", "4", "--nnodes", "2", "--time", "2:00:00"]) == 0
    sh, slurm = tmp_path / "jobs" / "jobs_paper.sh", tmp_path / "jobs" / "jobs_paper.slurm"
    lines = [line for line in sh.read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(cells) > 20  # every cell is missing (the paper's rows, AT and the ablations included)
    assert all(line.startswith("torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d") and "--resume" in line
               for line in lines)
    text = slurm.read_text()
    assert f"#SBATCH --array=0-{len(cells) - 1}" in text and "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=4" in text
    assert "#SBATCH --time=2:00:00" in text and "#SBATCH --signal=B:TERM@300" in text
    assert subprocess.run(["bash", "-n", str(slurm)]).returncode == 0

    # array task 2 on a fake cluster: the line for cell 2 runs with the rendezvous on the first node
    log = tmp_path / "calls.log"
    env = _stub_bin(tmp_path / "bin", log)
    done = subprocess.run(["bash", str(slurm)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text()
    cell = "_".join(cells[2])
    assert f"-m recipes.{cell} --profile paper" in calls and "--rdzv_endpoint node007:29500" in calls
    assert "--rdzv_id 77_2" in calls and "requeue" not in calls

    # the time-limit signal: forwarded to training, then the task requeues itself
    log.unlink()
    proc = subprocess.Popen(["bash", str(slurm)], env=dict(env, STUB_SLEEP="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not Path(f"{log}.started").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "requeueing" in out and "scontrol requeue 77_2" in log.read_text()

    # one node: torchrun --standalone; one GPU: plain python
    assert paper_tables.launch_line(("mnist", "trades", "vgg16"), "paper", "runs", 8).startswith(
        "torchrun --standalone --nproc_per_node 8 -m recipes.mnist_trades_vgg16")
    assert paper_tables.launch_line(("mnist", "trades", "vgg16"), "paper", "runs", 1).startswith(
        "python -m recipes.mnist_trades_vgg16")


# -- per-sample quantities: lambda sync, attack starts ------------------------------------------------

def _two_rank_reduce(other: torch.Tensor, norm: str):
    """reduce(t, op) as an all-reduce over two ranks would give it, the other rank holding ``other``."""
    def reduce(t, op):
        theirs = []
        normalize_batch(other, norm, reduce=lambda u, o: theirs.append(u) or u)   # the statistic it contributes
        return torch.maximum(t, theirs[0]) if op == "max" else t + theirs[0]
    return reduce


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("normalize", ["minmax", "mean"])
def test_global_lambda_is_the_same_loss_as_the_fused_one(normalize, backend, mnist_test):
    """sync="global" normalises H and s through reduce() (with the Triton kernels: lambda formed outside
    the kernel, the fused TRADES loss taking it as its KL weight); in one process, where the all-reduce
    is the identity, that is the local normalisation (the fused kernel's own). And the statistics of two
    shards, combined as the all-reduce does, give the whole batch's lambda."""
    if backend == "triton" and not triton_usable(torch.device("cpu")):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = random_smallcnn(0).eval()
    x = torch.from_numpy(mnist_test.images[:48].copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(mnist_test.labels[:48].copy()).long()
    start = random_start(x, 0.3, "linf", "trades", generator=torch.Generator().manual_seed(3))
    res = pgd_perturb(model, x, y, eps=0.3, step_size=0.15, steps=2, norm="linf", objective="kl", start=start)
    adv = AdvBatch(res.x_adv, res.last_grad_norm)
    outs = {}
    for sync in ("local", "global"):
        out = DTRADES(normalize=normalize, sync=sync).loss(model, x, y, adv, backend=backend, distributed=True)
        outs[sync] = (out, torch.autograd.grad(out.loss, list(model.parameters())))
    (a, ga), (b, gb) = outs["local"], outs["global"]
    # rtol 1e-5: 40x the one-ulp (2.4e-7) lambda gap measured under AVX2 (see the gradients below)
    assert torch.allclose(a.loss, b.loss, rtol=1e-5, atol=0)
    assert torch.allclose(a.stats["lambda"], b.stats["lambda"], rtol=1e-5, atol=1e-6)
    # Norm-wise, not element-wise: the two paths form lambda's batch mean in different summation orders, so
    # lambda may differ by a float32 ulp (measured: 2.4e-7 under AVX2, 0 under AVX-512), and the parameter
    # gradients by about that relative to their norm (measured 4.9e-7). Element-wise, a component that is
    # itself cancellation noise can differ by more than any rtol on some CPUs; 1e-5 is 20x the measured gap.
    for u, v in zip(ga, gb):
        assert float((u - v).norm()) <= 1e-5 * float(u.norm()) + 1e-12
    # two shards' statistics reduced by hand = the whole batch's
    h = b.stats["entropy"]
    whole = normalize_batch(h, normalize)
    sharded = normalize_batch(h[1::2], normalize, reduce=_two_rank_reduce(h[0::2], normalize))
    if normalize == "minmax":
        assert torch.equal(sharded, whole[1::2])
    else:
        assert torch.allclose(sharded, whole[1::2], rtol=1e-5)   # sum / count in another order: a few ulps


def _start(x, step, *, rank=0, world_size=1, kind, eps, norm, seed=5):
    """The training attack's start as TrainStep draws it: a generator seeded by (seed, step)."""
    g = torch.Generator().manual_seed(dist.derive_seed(seed, "attack-start", step))
    return random_start(x, eps, norm, kind, generator=g, rank=rank, world_size=world_size)


@pytest.mark.parametrize("kind,norm,eps", [("trades", "linf", 0.3), ("uniform", "linf", 0.3), ("uniform", "l2", 2.0)])
def test_attack_start_does_not_depend_on_the_sharding(kind, norm, eps):
    """Sample i of the global batch gets the same random start whether one process holds the batch or
    rank i % 2 of two holds it (the loaders' DistributedSampler order), and a new one at the next step."""
    x = torch.rand(12, 1, 28, 28)
    kw = dict(kind=kind, eps=eps, norm=norm)
    whole = _start(x, 7, **kw)
    for rank in (0, 1):
        assert torch.equal(_start(x[rank::2], 7, rank=rank, world_size=2, **kw), whole[rank::2])
    assert not torch.equal(_start(x, 8, **kw), whole)
    delta = (whole - x).flatten(1)
    if kind == "trades":
        assert 0 < float(delta.std()) < 0.002
    elif norm == "linf":
        assert float(delta.abs().max()) <= eps and float(delta.abs().max()) > 0.9 * eps
    else:
        assert float(torch.linalg.vector_norm(delta, dim=1).max()) <= eps * (1 + 1e-6)
    assert torch.equal(random_start(x, eps, norm, "none"), x)
