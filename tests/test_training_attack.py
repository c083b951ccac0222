"""The training attack is a PGD (TrainConfig.attack), the class the evaluation runs: the step's x' is that
object's output, the method supplies the objective and start it leaves unset, and records of the older flat
layout read as the same config."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import parse_train_config, random_smallcnn, train_config
from fastrobust import distributed as dist
from fastrobust import run_folder
from fastrobust.attacks import PGD, random_start
from fastrobust.config import TrainConfig, training_radius, upgraded
from fastrobust.errors import ConfigError
from fastrobust.methods import AT, MART, TRADES, Standard
from fastrobust.step import TrainStep

CPU = torch.device("cpu")


def _batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("method,objective,start", [(TRADES(), "kl", "trades"), (AT(), "ce", "uniform"),
                                                    (MART(), "ce", "trades")])
def test_the_method_fills_in_what_the_attack_leaves_unset(method, objective, start):
    cfg = train_config(dataset="mnist", model="smallcnn", method=method, eps=0.3, attack_steps=3,
                       attack_step_size=0.1, device="cpu").validate()
    assert (cfg.attack.objective, cfg.attack.random_start) == ("method", "method")   # recorded as the method's
    pgd = TrainStep(cfg, random_smallcnn(0), CPU).pgd
    assert isinstance(pgd, PGD) and (pgd.objective, pgd.random_start) == (objective, start)
    assert (pgd.eps, pgd.steps, pgd.step_size) == (0.3, 3, 0.1)
    assert TrainStep(dataclasses.replace(cfg, method=Standard()), random_smallcnn(0), CPU).pgd is None   # clean inputs


def test_the_step_attacks_with_that_pgd_object():
    """x' of the training step is PGD.perturb's from the step's per-sample start, and an objective given on
    the command line replaces the method's (here the CW margin for TRADES)."""
    cfg = parse_train_config(["--dataset", "mnist", "--model", "smallcnn", "--device", "cpu", "--eps", "0.3",
                              "--attack-steps", "4", "--attack-step-size", "0.1", "--attack-objective", "cw"])
    step = TrainStep(cfg, random_smallcnn(1).double(), CPU)
    assert (step.pgd.objective, step.pgd.random_start) == ("cw", "trades")
    x, y = _batch(2)
    x = x.double()
    adv = step.attack(x, y, step=7)
    g = torch.Generator().manual_seed(dist.derive_seed(cfg.seed, "attack-start", 7))
    start = random_start(x, 0.3, "linf", "trades", generator=g)
    expected = step.pgd.perturb(step.net, x, y, start=start)
    assert torch.equal(adv.x_adv, expected.x_adv) and torch.equal(adv.grad_norm, expected.last_grad_norm)
    assert not torch.equal(adv.x_adv, dataclasses.replace(step.pgd, objective="kl").perturb(step.net, x, y,
                                                                                            start=start).x_adv)
    # "none" is a start (x itself), not "the method's": the flag reaches it
    cfg = parse_train_config(["--dataset", "mnist", "--model", "smallcnn", "--attack-random-start", "none"])
    assert cfg.attack.random_start == "none" and cfg.attack.for_method(TRADES()).random_start == "none"


def test_the_attack_is_checked_once_where_it_is_built():
    with pytest.raises(ConfigError, match="attack steps must be an integer >= 1"):
        PGD(eps=0.3, step_size=0.1, steps=0)
    with pytest.raises(ConfigError, match="unknown attack objective 'ccw'"):
        parse_train_config(["--attack-objective", "ccw"])
    with pytest.raises(ConfigError, match="eps"):   # the radius against the data's range: the config, once known
        train_config(dataset="mnist", model="smallcnn", eps=3.0).validate()
    with pytest.raises(ConfigError, match="from a training method"):   # "method": a bare call has none
        PGD(eps=0.3, step_size=0.1, steps=3)(random_smallcnn(0), *_batch(0))


def test_a_record_of_the_flat_layout_reads_as_the_same_config():
    """Run folders written before TrainConfig.attack record eps/norm/attack_steps/attack_step_size at the top:
    they build the same config, compare equal on resume, and give eval the training radius."""
    new = train_config(dataset="mnist", model="smallcnn", eps=0.3, attack_steps=40, attack_step_size=0.01,
                       norm="linf").validate().to_dict()
    old = {k: v for k, v in new.items() if k != "attack"}
    old.update(eps=0.3, norm="linf", attack_steps=40, attack_step_size=0.01)
    assert TrainConfig.from_dict(old).validate() == TrainConfig.from_dict(new).validate()
    assert upgraded(old)["attack"] == {"eps": 0.3, "norm": "linf", "steps": 40, "step_size": 0.01}
    assert run_folder.compare_configs(old, new) == ([], {})
    changed = dict(new, attack=dict(new["attack"], steps=20))
    assert run_folder.compare_configs(old, changed)[0] == ["attack.steps: 40 -> 20"]
    assert training_radius(old) == training_radius(new) == 0.3 and training_radius({}) is None
