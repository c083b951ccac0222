"""DDP on the CPU (gloo, 2 processes started by torchrun): the same training math and exactly the same
evaluation as a single process, SIGTERM agreement across ranks, and exact resume.

What "the same" means for training. A DDP step and a single-process step from the same state on the
same global batch differ only in how the gradient is summed: each rank reduces its half of the batch,
then the all-reduce adds the halves (gloo's order), where one process sums the whole batch in one
kernel. Every per-sample quantity (attack, sensitivity, entropy, KL, the globally normalised lambda,
FAAL's all-reduced class weights) is bitwise equal - the attack's random start is drawn per sample.
So the weights after a step agree to float32 rounding: ~1e-8 relative to the weights, ~1e-6 relative
to the update (not bit-identical). Free-running multi-step trajectories are *not* compared: the
TRADES-family KL attack starts 0.001 away from x, where its gradient is a difference of two nearly
equal softmaxes, so a 1-ulp weight difference changes it by ~1e-3 and sign() turns that into whole
attack steps; after that the runs differ legitimately. Instead each DDP step is checked against one
single-process step from the DDP run's own checkpoint (which also exercises resuming a 2-process
checkpoint in 1 process).
"""
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

from conftest import random_smallcnn
from fastrobust import checkpoint as ck
from fastrobust.checkpoint import load_checkpoint
from fastrobust.config import EvalConfig
from fastrobust.evaluate import evaluate
from fastrobust.train import Trainer

REPO = Path(__file__).resolve().parents[1]
EVAL = {"num_samples": 90, "aa_samples": 30, "sweep_samples": 40, "batch_size": 20, "aa_version": "custom",
        "aa_attacks": ("apgd-ce",), "pgd_steps": 3, "pgd_step_size": 0.1, "sweep_multipliers": (0.0, 0.5, 1.0)}
METHODS = ("dtrades", "faal")


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return env


def _overrides(data_dir, init, **extra) -> dict:
    # 4 steps of a global batch of 64 (32 per rank); dropout off: masks could not match across layouts
    values = dict(train_limit=256, batch_size=64, epochs=1, attack_steps=2, attack_step_size=0.15, val_samples=40,
                  dropout=0.0, lambda_sync="global", init_checkpoint=str(init), ckpt_every_steps=1, progress=False,
                  data_dir=str(data_dir), eval=EVAL)
    values.update(extra)
    return values


def _set_args(values: dict) -> list[str]:
    return ["--set"] + [f"{k}={v!r}" for k, v in values.items()]


def _torchrun(args, nproc=2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """A SmallCNN with a random last layer (the default zero one makes every prediction uniform, and
    min-max normalising a constant entropy is ill-conditioned)."""
    model = random_smallcnn(0)
    path = tmp_path_factory.mktemp("init") / "init.pt"
    ck.atomic_save({"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir, init_ckpt):
    """The smoke recipe, D-TRADES then FAAL (--compare), on 2 gloo processes: 2 steps each, sharded
    validation and final evaluation (FGSM, PGD, AutoAttack APGD-CE, eps sweep)."""
    runs = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(["-m", "recipes.mnist_dtrades_smallcnn", "--profile", "smoke", "--runs", str(runs),
                      "--compare", "faal", *_set_args(_overrides(data_dir, init_ckpt))])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return runs, out


def _cfg(method, data_dir, init, out_dir, **extra):
    import recipes
    return recipes.make_config("mnist", method, "smallcnn", "smoke", overrides=dict(
        _overrides(data_dir, init, **extra), out_dir=str(out_dir)))


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
    2-process run's step 4: equal to float32 rounding of the gradient sums."""
    runs, _ = ddp_run
    ckpts = runs / f"mnist_{method}_smallcnn" / "smoke" / "checkpoints"
    before, after = load_checkpoint(ckpts / "step-00000003.pt"), load_checkpoint(ckpts / "step-00000004.pt")
    assert before["world_size"] == 2 and len(before["rng_ranks"]) == 2
    single = _one_step(_cfg(method, data_dir, init_ckpt, tmp_path, resume=True), ckpts / "step-00000003.pt")
    worst = 0.0
    for k, v in after["model"].items():
        if not v.is_floating_point():
            continue
        update = float((v - before["model"][k]).norm())
        diff = float((single[k] - v).norm())
        # float32 rounding: of the weights (~1e-8 relative) and of the gradient sums (~1e-6 of the update)
        assert diff <= 1e-7 * float(v.norm()) + 1e-4 * update, (method, k, diff, update)
        worst = max(worst, diff / max(update, 1e-30))
    assert worst > 0  # not bit-identical: the all-reduce sums in another order (if this fails, rejoice and tighten)


def test_distributed_evaluation_equals_single_process_exactly(ddp_run, mnist_test):
    runs, out = ddp_run
    run = runs / "mnist_dtrades_smallcnn" / "smoke"
    (ddp,) = json.loads((run / "results.json").read_text()).values()
    model, _ = ck.load_model(run / "checkpoints" / "final.pt")
    cfg = EvalConfig(dataset="mnist", **EVAL)
    single = evaluate(model, mnist_test.images, mnist_test.labels, cfg, progress=False, distributed=False).to_dict()
    for key in ("n", "na", "ra", "n_attacked", "na_on_attacked", "conditional_asr", "sweep", "rd", "asr",
                "all_checks_passed"):
        assert single[key] == ddp[key], key
    assert [c["detail"] for c in single["checks"]] == [c["detail"] for c in ddp["checks"]]
    assert single["n_attacked"]["autoattack"] == 30 and len(single["sweep"]) == 4
    # the per-epoch validation ran sharded too
    epoch = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"kind": "epoch"' in line][-1]
    val = evaluate(model, mnist_test.images, mnist_test.labels,
                   EvalConfig(dataset="mnist", attacks=("pgd",), pgd_steps=3, pgd_step_size=0.1, num_samples=40,
                              aa_samples=0, sweep_samples=0, batch_size=20), progress=False, distributed=False)
    assert (epoch["val_na"], epoch["val_pgd_ra"]) == (val.na, val.ra["pgd"])
    # rank 0 alone wrote and printed
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
    ref = load_checkpoint(runs / "mnist_dtrades_smallcnn" / "smoke" / "checkpoints" / "final.pt")
    args = ["-m", "recipes.mnist_dtrades_smallcnn", "--profile", "smoke", "--runs", str(tmp_path)]
    values = _overrides(data_dir, init_ckpt, final_eval=False)
    proc = _torchrun(args + _set_args(values))
    ckpts = tmp_path / "mnist_dtrades_smallcnn" / "smoke" / "checkpoints"
    log = tmp_path / "mnist_dtrades_smallcnn" / "smoke" / "log.jsonl"
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

    proc = _torchrun(args + ["--resume"] + _set_args(values))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("resumed from") == 1
    final = load_checkpoint(ckpts / "final.pt")
    assert final["global_step"] == ref["global_step"] == 4
    for k, v in ref["model"].items():
        assert torch.equal(v, final["model"][k]), k


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

    assert paper_tables.main(["--runs", str(tmp_path / "runs"), "--emit-jobs", str(tmp_path / "jobs"),
                              "--nproc-per-node", "4", "--nnodes", "2", "--time", "2:00:00"]) == 0
    sh, slurm = tmp_path / "jobs" / "jobs_paper.sh", tmp_path / "jobs" / "jobs_paper.slurm"
    lines = [line for line in sh.read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(paper_tables.cells()) == 20  # every cell is missing
    assert all(line.startswith("torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d") and "--resume" in line
               for line in lines)
    text = slurm.read_text()
    assert "#SBATCH --array=0-19" in text and "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=4" in text
    assert "#SBATCH --time=2:00:00" in text and "#SBATCH --signal=B:TERM@300" in text
    assert subprocess.run(["bash", "-n", str(slurm)]).returncode == 0

    # array task 2 on a fake cluster: the line for cell 2 runs with the rendezvous on the first node
    log = tmp_path / "calls.log"
    env = _stub_bin(tmp_path / "bin", log)
    done = subprocess.run(["bash", str(slurm)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text()
    cell = "_".join(paper_tables.cells()[2])
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


# -- per-sample quantities: lambda_sync ----------------------------------------------------------

@pytest.mark.parametrize("norm", ["minmax", "mean"])
def test_global_lambda_is_the_same_loss_as_the_fused_one(norm, mnist_test):
    """lambda_sync="global" forms lambda outside the kernel (entropy from loss_head, trades_loss with
    lambda as the KL weight); in one process that is dtrades_loss's own normalisation. And the global
    statistics of two shards, combined as the all-reduce does, give the whole batch's lambda."""
    from fastrobust.config import TrainConfig
    from fastrobust.methods import build_method, normalize_global

    torch.manual_seed(0)
    model = random_smallcnn(0).eval()
    x = torch.from_numpy(mnist_test.images[:48].copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(mnist_test.labels[:48].copy()).long()
    outs = {}
    for sync in ("local", "global"):
        cfg = TrainConfig(dataset="mnist", model="smallcnn", method="dtrades", eps=0.3, attack_steps=2,
                          attack_step_size=0.15, lambda_norm=norm, lambda_sync=sync).validate()
        method = build_method(cfg)
        adv = method.attack(model, x, y, start=method.start(x, step=3))
        out = method.loss(model, x, y, adv)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        outs[sync] = (out, grads)
    (a, ga), (b, gb) = outs["local"], outs["global"]
    assert torch.allclose(a.loss, b.loss, rtol=1e-6, atol=0)
    assert torch.allclose(a.stats["lambda"], b.stats["lambda"], rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(u, v, rtol=1e-5, atol=1e-8) for u, v in zip(ga, gb))
    # two shards' statistics reduced by hand = the whole batch's
    h, s = b.stats["entropy"], b.stats["sensitivity"]
    whole = normalize_global([h, s], norm, distributed=False)
    if norm == "minmax":
        lo = torch.minimum(h[0::2].min(), h[1::2].min())
        hi = torch.maximum(h[0::2].max(), h[1::2].max())
        assert torch.equal(whole[0][1::2], (h[1::2] - lo) / (hi - lo))
    else:
        mean = (h[0::2].sum() + h[1::2].sum()) / len(h)
        assert torch.allclose(whole[0][1::2], h[1::2] / mean, rtol=1e-6)


@pytest.mark.parametrize("kind,norm,eps", [("trades", "linf", 0.3), ("uniform", "linf", 0.3), ("uniform", "l2", 2.0)])
def test_attack_start_does_not_depend_on_the_sharding(kind, norm, eps):
    """Sample i of the global batch gets the same random start whether one process holds the batch or
    rank i % 2 of two holds it (the loaders' DistributedSampler order), and a new one at the next step."""
    from fastrobust.methods import attack_start

    x = torch.rand(12, 1, 28, 28)
    kw = dict(kind=kind, eps=eps, norm=norm, seed=5)
    whole = attack_start(x, step=7, **kw)
    for rank in (0, 1):
        assert torch.equal(attack_start(x[rank::2], step=7, rank=rank, world_size=2, **kw), whole[rank::2])
    assert not torch.equal(attack_start(x, step=8, **kw), whole)
    delta = (whole - x).flatten(1)
    if kind == "trades":
        assert 0 < float(delta.std()) < 0.002
    elif norm == "linf":
        assert float(delta.abs().max()) <= eps and float(delta.abs().max()) > 0.9 * eps
    else:
        assert float(torch.linalg.vector_norm(delta, dim=1).max()) <= eps * (1 + 1e-6)
    assert attack_start(x, kind="none", eps=eps, norm=norm, seed=5, step=7) is None
