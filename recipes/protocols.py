"""The protocols, as tables of values: one :class:`Profile` each, to read line by line against the papers.

A profile says which cells (dataset, row, architecture) it trains, the run settings per dataset, the
method of every row with its options, the evaluation per dataset, and per-cell exceptions. A row is a
line of the paper's tables: a method with its options (``dtrades_half`` is D-TRADES with
alpha = beta = 0.5, the paper's Tables 6.1/6.2 ablation).

paper     The D-TRADES paper's protocol as stated: SGD momentum 0.9, batch 128; CIFAR-10 100 epochs, lr 0.1
          x0.1 at epochs 90 and 100 (counted from 1: 90-99 at 0.01, 100 at 0.001), wd 2e-4, eps 0.031,
          PGD-10 step 0.007; MNIST 50 epochs, lr 0.01, eps 0.3, PGD-20 step 0.01; TRADES beta 4, MART beta 5,
          FAAL r 0.1 (this project's reading of the paper: FAAL trained from scratch with the TRADES base
          loss; the official code only fine-tunes), D-TRADES alpha = beta = 1 (and 0.5). Evaluation at the
          training radius: PGD-20 step 0.003 (CIFAR-10, as the official TRADES evaluation) and 0.01 (MNIST,
          the paper's, which cannot cover the 0.3 ball: the evaluation flags it), AutoAttack standard.
official  The baselines as their official code runs them: TRADES (yaodongyu/TRADES: beta 6, 76 epochs,
          x0.1 from epoch 75; MNIST beta 1, 100 epochs, PGD-40), MART (YisenWang/MART train_resnet.py:
          120 epochs, lr 0.01, wd 3.5e-3, beta 5), FAAL (TrustAI/FAAL ft_prn.py + run_prn.py: a 2-epoch
          fine-tune of that architecture's official-profile TRADES checkpoint with the AT base loss, r 0.5,
          lr 0.01 then 0.001, wd 5e-4, eps 8/255, step 2/255, 10 steps, best worst-class PGD accuracy kept;
          here on a validation split, where the official code looks at the test set).
smoke     Real data, a small subset, two epochs: a whole recipe in minutes on a 2-core CPU; it checks the
          pipeline, not accuracy. The default without a GPU.
demo      MNIST SmallCNN, D-TRADES (alpha = beta = 1) against TRADES (beta 4) from scratch, at a radius a CPU
          trains to robustness in minutes: eps 0.1, a PGD-5 x 0.025 training attack (covers the ball), one
          epoch of the training set (all but the 1000 held-out images), lr 0.05 cosine, batch 128, no weight
          decay; evaluated with FGSM and PGD-20 x 0.0125 on 1000 test points and APGD-CE + APGD-T on the
          first 100: ``make demo``, about 7 minutes on 2 cores. Not the paper's protocol.
cpu       Every row on MNIST SmallCNN at CPU scale, the same threat model and training attack as demo, two
          epochs; FGSM and PGD-40 x 0.01 on 1000 test points, standard AutoAttack on the first 200: the
          README's "Results (CPU scale)" tables, ``python -m recipes.paper_tables --profile cpu``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastrobust.methods import AT, DTRADES, FAAL, MART, TRADES, Method, Standard

ARCHS = {"cifar10": ("resnet18", "vgg16"), "mnist": ("resnet18", "vgg16", "smallcnn")}
DISPLAY = {"resnet18": "ResNet-18", "vgg16": "VGG-16", "smallcnn": "SmallCNN", "preact_resnet18": "PreAct ResNet-18",
           "wrn34_10": "WRN-34-10", "cifar10": "CIFAR-10", "mnist": "MNIST"}   # the names the papers print


@dataclass(frozen=True)
class Profile:
    name: str
    cells: tuple[tuple[str, str, str], ...]          # (dataset, row, arch)
    data: dict[str, dict[str, Any]]                  # run settings per dataset
    rows: dict[str, Method]                          # the method of each row
    eval: dict[str, dict[str, Any]]                  # evaluation options per dataset
    cell: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)   # per-cell exceptions


def grid(datasets, rows, archs=None) -> tuple[tuple[str, str, str], ...]:
    return tuple((d, r, a) for d in datasets for a in (archs or ARCHS[d]) for r in rows)


PAPER_ROWS = {
    "standard":      Standard(),
    "at":            AT(),
    "trades":        TRADES(beta=4.0),
    "mart":          MART(beta=5.0),
    "faal":          FAAL(r=0.1, base="trades", beta=4.0),
    "dtrades":       DTRADES(alpha=1.0, beta=1.0, norm="minmax", scale=1.0),
    "dtrades_half":  DTRADES(alpha=0.5, beta=0.5, norm="minmax", scale=1.0),
    # this project's variant, in no paper: mean-normalised lambda with batch mean 3 x (1 + 1) = 6, TRADES' beta
    "dtrades_mean6": DTRADES(alpha=1.0, beta=1.0, norm="mean", scale=3.0),
}
SGD = dict(batch_size=128, momentum=0.9)
PAPER_EVAL = {
    "cifar10": dict(eps=0.031, pgd_steps=20, pgd_step_size=0.003, aa_version="standard", aa_samples=1000),
    "mnist":   dict(eps=0.3,   pgd_steps=20, pgd_step_size=0.01,  aa_version="standard", aa_samples=1000),
}

PAPER = Profile(
    name="paper",
    cells=grid(("cifar10", "mnist"), PAPER_ROWS),
    data={
        "cifar10": dict(**SGD, epochs=100, lr=0.1, lr_schedule="piecewise", lr_milestones=(90, 100), weight_decay=2e-4,
                        eps=0.031, attack_steps=10, attack_step_size=0.007),
        "mnist":   dict(**SGD, epochs=50, lr=0.01, lr_schedule="constant", weight_decay=0.0,
                        eps=0.3, attack_steps=20, attack_step_size=0.01),
    },
    rows=PAPER_ROWS,
    eval=PAPER_EVAL,
)

FAAL_FINETUNE = dict(epochs=2, lr=0.01, lr_schedule="piecewise", lr_milestones=(2,), weight_decay=5e-4,
                     eps=8 / 255, attack_steps=10, attack_step_size=2 / 255, select_by="worst_class_pgd_ra")
OFFICIAL = Profile(
    name="official",
    cells=grid(("cifar10", "mnist"), ("trades",)) + grid(("cifar10",), ("mart",))
    + grid(("cifar10",), ("trades", "faal"), ("preact_resnet18", "wrn34_10")) + grid(("cifar10",), ("faal",)),
    data={
        "cifar10": dict(**SGD, epochs=76, lr=0.1, lr_schedule="piecewise", lr_milestones=(75, 90, 100),
                        weight_decay=2e-4, eps=0.031, attack_steps=10, attack_step_size=0.007),
        "mnist":   dict(**SGD, epochs=100, lr=0.01, lr_schedule="piecewise", lr_milestones=(55, 75, 90),
                        weight_decay=0.0, eps=0.3, attack_steps=40, attack_step_size=0.01),
    },
    rows={"trades": TRADES(beta=6.0), "mart": MART(beta=5.0), "faal": FAAL(r=0.5, base="at")},
    eval={"cifar10": dict(eps=0.031, pgd_steps=20, pgd_step_size=0.003), "mnist": dict(eps=0.3, pgd_steps=40,
                                                                                       pgd_step_size=0.01)},
    cell={
        **{("mnist", "trades", a): {"method": TRADES(beta=1.0)} for a in ARCHS["mnist"]},
        **{("cifar10", "mart", a): dict(epochs=120, lr=0.01, weight_decay=3.5e-3) for a in ARCHS["cifar10"]},
        **{("cifar10", "faal", a): dict(FAAL_FINETUNE, init_from="trades", eval=dict(eps=8 / 255, pgd_steps=20,
                                                                                    pgd_step_size=2 / 255))
           for a in ("preact_resnet18", "wrn34_10", "resnet18", "vgg16")},
    },
)

SMOKE_EVAL = dict(num_samples=100, aa_samples=20, sweep_samples=20, batch_size=100, sweep_multipliers=(0.0, 0.5, 1.0, 2.0),
                  aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"))
SMOKE = Profile(
    name="smoke",
    cells=PAPER.cells,
    # ResNet-18 / VGG-16 TRADES-10 steps run at ~6 img/s on 2 CPU cores: every pass stays small. Eight steps
    # from scratch at lr 0.1 collapse them to one class; at 0.01 they learn.
    data={
        "cifar10": dict(PAPER.data["cifar10"], epochs=2, lr=0.01, lr_schedule="constant", train_limit=256,
                        batch_size=64, val_samples=32, log_every=1),
        "mnist":   dict(PAPER.data["mnist"], epochs=2, lr_schedule="constant", train_limit=2048, val_samples=256,
                        log_every=1),
    },
    rows=PAPER_ROWS,
    eval={"cifar10": dict(PAPER_EVAL["cifar10"], **SMOKE_EVAL),
          "mnist": dict(PAPER_EVAL["mnist"], num_samples=500, aa_samples=100, sweep_samples=100, batch_size=250)},
    cell={(d, r, a): dict(train_limit=256, batch_size=64, val_samples=32, lr=0.01, eval=dict(PAPER_EVAL["mnist"],
                                                                                            **SMOKE_EVAL))
          for d, r, a in PAPER.cells if d == "mnist" and a != "smallcnn"},
)

CPU_DATA = dict(**SGD, lr=0.05, lr_schedule="cosine", weight_decay=0.0, eps=0.1, attack_steps=5, attack_step_size=0.025)
CPU_EVAL = dict(eps=0.1, pgd_steps=40, pgd_step_size=0.01, num_samples=1000, aa_version="standard", aa_samples=200,
                sweep_samples=200)
DEMO = Profile(
    name="demo",
    cells=grid(("mnist",), ("dtrades", "trades"), ("smallcnn",)),
    data={"mnist": dict(CPU_DATA, epochs=1, val_samples=1000)},
    rows={"dtrades": PAPER_ROWS["dtrades"], "trades": PAPER_ROWS["trades"]},
    eval={"mnist": dict(CPU_EVAL, pgd_steps=20, pgd_step_size=0.0125, aa_version="custom",
                        aa_attacks=("apgd-ce", "apgd-t"), aa_samples=100, sweep_samples=100)},
)

CPU = Profile(
    name="cpu",
    cells=grid(("mnist",), ("standard", "at", "trades", "mart", "faal", "dtrades", "dtrades_half"), ("smallcnn",)),
    data={"mnist": dict(CPU_DATA, epochs=2)},
    rows=PAPER_ROWS,
    eval={"mnist": CPU_EVAL},
)

PROFILES: dict[str, Profile] = {p.name: p for p in (PAPER, OFFICIAL, SMOKE, DEMO, CPU)}
