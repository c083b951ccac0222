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
          here on a validation split, where the official code looks at the test set). AWP (csdongxian/AWP):
          AT-AWP (AT_AWP/train_cifar10.py: PreAct ResNet-18, 200 epochs, lr 0.1 x0.1 at epochs 100 and 150
          counted from 0, wd 5e-4, eps 8/255, PGD-10 x 2/255, the CIFAR-10 mean/std as input
          normalisation, gamma 1e-2 as its default and its logs, no warm-up) and TRADES-AWP
          (trades_AWP/train_trades_cifar.py: WRN-34-10, beta 6, gamma 5e-3, 200 epochs, x0.1 from epochs
          100 and 150 counted from 1, wd 5e-4, eps 8/255, PGD-10 x 2/255, raw inputs; it perturbs from its
          epoch 10 counted from 1, i.e. after 9 epochs: warmup_epochs 9 here, where epochs count from 0).
smoke     Real data, a small subset, two epochs: a whole recipe in minutes on a 2-core CPU; it checks the
          pipeline, not accuracy. The default without a GPU.
demo      MNIST SmallCNN, D-TRADES (alpha = beta = 1) against TRADES (beta 4) from scratch, at a radius a CPU
          trains to robustness in minutes: eps 0.1, a PGD-5 x 0.025 training attack (covers the ball), one
          epoch of the training set (all but the 1000 held-out images), lr 0.05 cosine, batch 128, no weight
          decay; evaluated with FGSM and PGD-20 x 0.0125 on 1000 test points and APGD-CE + APGD-T on the
          first 100: ``make demo``, about 7 minutes on 2 cores. Not the paper's protocol.
cpu       Every row on MNIST SmallCNN at CPU scale, the same threat model and training attack as demo, two
          epochs; FGSM and PGD-40 x 0.01 on 1000 test points, standard AutoAttack on the first 200: the
          README's "Results (CPU scale, eps 0.1)" tables, ``python -m recipes.paper_tables --profile cpu``.
          Also AT-AWP and TRADES-AWP (this project's addition: AWP's gamma 5e-3 of the paper and of the
          official TRADES-AWP code, no warm-up in two epochs, TRADES-AWP at this profile's TRADES beta 4).
cpu_eps03 Every row on MNIST SmallCNN at the report's radius 0.3, raw inputs, a PGD-10 x 0.04 training attack,
          one epoch over the first 30,000 training images; three seeds for trades, dtrades and dtrades_half;
          FGSM and PGD-40 x 0.01 on 1000 test points, standard AutoAttack on the first 100: the comparison
          with statistics in README's "Results (CPU scale, eps 0.3)".

Below the profiles, ``NOTES`` labels every choice of the paper profile with its source (the report's
text, the report's code, or this project) and what the report's code does where it differs;
:func:`protocol_notes` gives a cell's notes to its run manifest, ``python -m recipes --profile paper``
prints them, and the comment above ``NOTES`` summarises the report's notebooks, with their commits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastrobust.methods import AT, AWP, DTRADES, FAAL, MART, TRADES, Method, Standard

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
    seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)   # training seeds per row (default: 0 only)

    def seeds_of(self, row: str) -> tuple[int, ...]:
        return self.seeds.get(row, (0,))


def grid(datasets, rows, archs=None) -> tuple[tuple[str, str, str], ...]:
    return tuple((d, r, a) for d in datasets for a in (archs or ARCHS[d]) for r in rows)


PAPER_ROWS = {
    "standard":      Standard(),
    "at":            AT(),
    "trades":        TRADES(beta=4.0),
    "mart":          MART(beta=5.0),
    "faal":          FAAL(r=0.1, base="trades", beta=4.0),
    "dtrades":       DTRADES(alpha=1.0, beta=1.0, normalize="minmax", lambda_scale=1.0),
    "dtrades_half":  DTRADES(alpha=0.5, beta=0.5, normalize="minmax", lambda_scale=1.0),
    # this project's variant, in no paper: mean-normalised lambda with batch mean 3 x (1 + 1) = 6, TRADES' beta
    "dtrades_mean6": DTRADES(alpha=1.0, beta=1.0, normalize="mean", lambda_scale=3.0),
}
# The rows as the report names them (its printed tables and its repository's results, recipes/published.py)
# -> the rows above; and the rows of its D-TRADES ablation, Tables 6.1/6.2: alpha = beta = 0.5 against 1.0.
REPORT_ROWS = {
    "Standard": "standard",
    "TRADES": "trades",
    "MART": "mart",
    "FAAL": "faal",
    "D-TRADES": "dtrades",                          # Tables 6.3-6.8: the alpha = beta = 1 model (Section 6.5)
    "D-TRADES alpha=1.0 beta=1.0": "dtrades",
    "D-TRADES alpha=0.5 beta=0.5": "dtrades_half",
}
ABLATION = ("dtrades_half", "dtrades")
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
                        attack=dict(eps=0.031, steps=10, step_size=0.007), input_normalization="none"),
        "mnist":   dict(**SGD, epochs=50, lr=0.01, lr_schedule="constant", weight_decay=0.0,
                        attack=dict(eps=0.3, steps=20, step_size=0.01), input_normalization="none"),
    },
    rows=PAPER_ROWS,
    eval=PAPER_EVAL,
)

# AWP's official code (csdongxian/AWP), both 200 epochs of SGD (batch 128, momentum 0.9, lr 0.1, wd 5e-4) at
# eps 8/255 with PGD-10 x 2/255. AT_AWP/train_cifar10.py sets the rate per iteration from t = epoch + (i+1)/n
# (epochs from 0): 0.1 while t < 100, 0.01 while t < 150, then 0.001, i.e. from epochs 101 and 151 counted from 1
# (the last step of epochs 100 and 150 already at the lower rate there); it attacks in train mode, this project in
# eval mode. trades_AWP/train_trades_cifar.py: x0.1 from epochs 100 and 150 counted from 1, and AWP from its epoch 10.
AWP_OFFICIAL = dict(epochs=200, lr=0.1, lr_schedule="piecewise", weight_decay=5e-4,
                    attack=dict(eps=8 / 255, steps=10, step_size=2 / 255),
                    eval=dict(eps=8 / 255, pgd_steps=20, pgd_step_size=2 / 255))
FAAL_FINETUNE = dict(epochs=2, lr=0.01, lr_schedule="piecewise", lr_milestones=(2,), weight_decay=5e-4,
                     attack=dict(eps=8 / 255, steps=10, step_size=2 / 255), select_by="worst_class_pgd_ra")
OFFICIAL = Profile(
    name="official",
    cells=grid(("cifar10", "mnist"), ("trades",)) + grid(("cifar10",), ("mart",))
    + grid(("cifar10",), ("trades", "faal"), ("preact_resnet18", "wrn34_10")) + grid(("cifar10",), ("faal",))
    + grid(("cifar10",), ("at_awp",), ("preact_resnet18",)) + grid(("cifar10",), ("trades_awp",), ("wrn34_10",)),
    data={
        # raw [0, 1] inputs: the official TRADES, MART and FAAL code feeds transforms.ToTensor() straight in
        "cifar10": dict(**SGD, epochs=76, lr=0.1, lr_schedule="piecewise", lr_milestones=(75, 90, 100),
                        weight_decay=2e-4, attack=dict(eps=0.031, steps=10, step_size=0.007),
                        input_normalization="none"),
        "mnist":   dict(**SGD, epochs=100, lr=0.01, lr_schedule="piecewise", lr_milestones=(55, 75, 90),
                        weight_decay=0.0, attack=dict(eps=0.3, steps=40, step_size=0.01), input_normalization="none"),
    },
    rows={"trades": TRADES(beta=6.0), "mart": MART(beta=5.0), "faal": FAAL(r=0.5, base="at"),
          "at_awp": AWP(base="at", gamma=1e-2, warmup_epochs=0),
          "trades_awp": AWP(base="trades", gamma=5e-3, warmup_epochs=9, beta=6.0)},
    eval={"cifar10": dict(eps=0.031, pgd_steps=20, pgd_step_size=0.003), "mnist": dict(eps=0.3, pgd_steps=40,
                                                                                       pgd_step_size=0.01)},
    cell={
        **{("mnist", "trades", a): {"method": TRADES(beta=1.0)} for a in ARCHS["mnist"]},
        **{("cifar10", "mart", a): dict(epochs=120, lr=0.01, weight_decay=3.5e-3) for a in ARCHS["cifar10"]},
        **{("cifar10", "faal", a): dict(FAAL_FINETUNE, init_from="trades", eval=dict(eps=8 / 255, pgd_steps=20,
                                                                                    pgd_step_size=2 / 255))
           for a in ("preact_resnet18", "wrn34_10", "resnet18", "vgg16")},
        ("cifar10", "at_awp", "preact_resnet18"): dict(AWP_OFFICIAL, lr_milestones=(101, 151),
                                                       input_normalization="dataset"),
        ("cifar10", "trades_awp", "wrn34_10"): dict(AWP_OFFICIAL, lr_milestones=(100, 150)),
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

CPU_DATA = dict(**SGD, lr=0.05, lr_schedule="cosine", weight_decay=0.0, attack=dict(eps=0.1, steps=5, step_size=0.025))
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

# AT-AWP and TRADES-AWP at CPU scale (this project's addition): gamma 5e-3 (the AWP paper's and the official
# TRADES-AWP code's), perturbing from the first of the two epochs, TRADES-AWP at the rows' TRADES beta 4.
CPU_AWP_ROWS = {"at_awp": AWP(base="at", gamma=5e-3), "trades_awp": AWP(base="trades", gamma=5e-3, beta=4.0)}
CPU = Profile(
    name="cpu",
    cells=grid(("mnist",), ("standard", "at", "trades", "mart", "faal", "dtrades", "dtrades_half", *CPU_AWP_ROWS),
               ("smallcnn",)),
    data={"mnist": dict(CPU_DATA, epochs=2)},
    rows={**PAPER_ROWS, **CPU_AWP_ROWS},
    eval={"mnist": CPU_EVAL},
)

# The report's MNIST radius at CPU scale. A PGD-10 x 0.04 training attack covers the 0.3 ball (10 x 0.04 =
# 0.4); raw [0, 1] inputs, as the official TRADES MNIST code; the evaluation's PGD-40 x 0.01 covers it too.
# Three seeds for the rows the report compares (D-TRADES at alpha = beta = 1 and 0.5 against TRADES).
# Budget (README "Results (CPU scale, eps 0.3)"): 13 runs of some minutes each on 2 cores, so one epoch over
# the first 30,000 training images (234 steps) and standard AutoAttack on the first 100 test points. Measured
# at that length: TRADES' AutoAttack RA 16% (PGD-40 40%), below saturation but also below the 40-90% band a
# longer run would reach (validation PGD-40 RA was still rising); a longer profile needs more machine time.
EPS03_DATA = dict(**SGD, lr=0.05, lr_schedule="cosine", weight_decay=0.0, attack=dict(eps=0.3, steps=10,
                  step_size=0.04), input_normalization="none", epochs=1, train_limit=30000, val_samples=1000)
EPS03_EVAL = dict(eps=0.3, pgd_steps=40, pgd_step_size=0.01, num_samples=1000, aa_version="standard",
                  aa_samples=100, sweep_samples=100)
CPU_EPS03 = Profile(
    name="cpu_eps03",
    cells=grid(("mnist",), ("standard", "at", "trades", "mart", "faal", "dtrades", "dtrades_half"), ("smallcnn",)),
    data={"mnist": EPS03_DATA},
    rows=PAPER_ROWS,
    eval={"mnist": EPS03_EVAL},
    seeds={row: (0, 1, 2) for row in ("trades", "dtrades", "dtrades_half")},
)

PROFILES: dict[str, Profile] = {p.name: p for p in (PAPER, OFFICIAL, SMOKE, DEMO, CPU, CPU_EPS03)}


# ------------------------------------------------------------------------------------------ protocol notes
# Where each choice of a profile comes from. The report (chapter 6) states the optimiser, batch, epochs, lr
# and its decay epochs, CIFAR-10's weight decay, the radii, the training attacks and the methods' options;
# everything else is a gap, filled from the report's code where that code shows it, else by this project.
# The report's code (Jorgee18/Seminario), read for these notes:
#   Seminario/Entrenamiento/D-trades-cifar10.ipynb @ af31555 (unchanged at HEAD 0c8183c), the notebook whose
#     checkpoint names (model-nn-epoch100.pt) the stored CIFAR-10 results evaluate: ToTensor only, after a
#     random crop (pad 4) and flip; no Normalize; SGD lr 0.1, momentum 0.9, and no weight decay (2e-4 is
#     parsed but not given to the optimiser); lr x0.1 from epoch 75, x0.01 from 90, x0.001 from 100 (epochs
#     counted from 1); 100 epochs, batch 128, eps 0.031, PGD-10 x 0.007, alpha = beta = 1, seed 1; trains on
#     all 50,000 images and keeps every epoch's checkpoint; per epoch PGD-20 x 0.003 on the test set.
#   Seminario/Entrenamiento/D-trades-mnist.ipynb @ 1b56c0f: ToTensor only, no augmentation, no Normalize;
#     SGD lr 0.01, momentum 0.9, no weight decay; decay epochs 55, 75, 90 lie beyond its 50 epochs (a
#     constant lr); batch 128, eps 0.3, PGD-20 x 0.01; ResNet-18 with a one-channel 3x3 stem, VGG-16 with
#     one input channel.
#   Seminario/Entrenamiento/d-trades-cifar10.ipynb and d-trades_mnist.ipynb @ 6ac97c5 (deleted at 5c69743,
#     c31d4cd): earlier versions built around a k-fold search (CIFAR-10: 2 folds, 5 epochs by default, no
#     augmentation, no checkpoint saved; MNIST: a checkpoint every third epoch by default, so none at epoch
#     50); not the notebooks of the reported models. Neither normalises its inputs either.
#   Seminario/Método/d-trades.ipynb @ 6ac97c5: the loss. The attack runs in eval mode from x + 0.001 N(0, 1)
#     on the summed KL; entropy with p clamped at 1e-12; the sensitivity per sample in a loop, in eval mode;
#     min-max normalisation over the batch (+1e-8); lambda detached; the robust term the batch mean of
#     lambda_i KL_i.
#   Seminario/Models/{resnet,vgg}.py @ 5a989ce: no normalisation layer; VGG-16 with batch norm.
#   Seminario/Resultado/evaluate_attacks_{cifar10,mnist}.ipynb @ 801747a: ToTensor only; PGD-20 x 0.003
#     (uniform start) at the training radius, FGSM at 0.03, standard AutoAttack at 8/255 on the first 1000
#     test images, on both datasets; the last epoch's checkpoint.
REPORT, REPORT_CODE, PROJECT = "report", "report's code", "this project"
NOTE_SOURCES = (REPORT, REPORT_CODE, PROJECT)


@dataclass(frozen=True)
class Note:
    """One choice of a profile: ``setting`` is a config field (``weight_decay``, ``eval.aa_samples``,
    ``method.sensitivity``) and ``value`` its value in every cell the note covers; or, with ``field`` False, a
    practice named in words. ``source`` says whose choice it is; ``code`` what the report's code does where
    that differs from ``value``."""
    setting: str
    value: Any
    source: str
    why: str
    code: str = ""
    datasets: tuple[str, ...] = ()   # empty: every dataset
    methods: tuple[str, ...] = ()    # empty: every row's method
    field: bool = True

    def __post_init__(self):
        if self.source not in NOTE_SOURCES:
            raise ValueError(f"note {self.setting!r}: source {self.source!r} is none of {', '.join(NOTE_SOURCES)}")

    def covers(self, dataset: str, method: str) -> bool:
        return (not self.datasets or dataset in self.datasets) and (not self.methods or method in self.methods)

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "value": self.value, "source": self.source, "why": self.why,
                **({"report_code": self.code} if self.code else {})}


NB_CIFAR = "D-trades-cifar10.ipynb @ af31555"
NB_MNIST = "D-trades-mnist.ipynb @ 1b56c0f"
NB_LOSS = "Método/d-trades.ipynb @ 6ac97c5"
NB_EVAL = "evaluate_attacks_*.ipynb @ 801747a"
PAPER_NOTES = (
    Note("lr_milestones", (90, 100), REPORT, "Sections 6.4/6.5: the lr is reduced at epochs 90 and 100",
         code=f"x0.1 from epoch 75, 90 and 100 ({NB_CIFAR}), the official TRADES schedule", datasets=("cifar10",)),
    Note("lr_gamma", 0.1, REPORT_CODE, f"the text names the epochs, not the factor; {NB_CIFAR} divides by 10 at "
         "each", datasets=("cifar10",)),
    Note("weight_decay", 2e-4, REPORT, "Sections 6.4/6.5", code=f"parsed but never given to the optimiser "
         f"({NB_CIFAR}): the reported CIFAR-10 models trained without weight decay", datasets=("cifar10",)),
    Note("weight_decay", 0.0, REPORT_CODE, f"the text gives none for MNIST; {NB_MNIST} uses none",
         datasets=("mnist",)),
    Note("lr_schedule", "constant", REPORT_CODE, f"the text gives no decay for MNIST; the decay epochs of {NB_MNIST} "
         "(55, 75, 90) lie beyond its 50 epochs", datasets=("mnist",)),
    Note("augmentation", "CIFAR-10: random crop (pad 4) and horizontal flip; MNIST: none", REPORT_CODE,
         f"the text does not say; {NB_CIFAR} and {NB_MNIST} do this", field=False),
    Note("input_normalization", "none", REPORT_CODE, "raw [0, 1] inputs: the text does not say; the report's "
         "notebooks apply ToTensor only and its models have no normalisation layer"),
    Note("D-TRADES lambda", "detached: no gradient flows through lambda", REPORT_CODE,
         f"Algorithm 5.1 does not say; {NB_LOSS} detaches it", methods=("dtrades",), field=False),
    Note("method.entropy_eps", 1e-12, REPORT_CODE, f"Algorithm 5.1 writes log(p + EPS); {NB_LOSS} clamps p at 1e-12",
         methods=("dtrades",)),
    Note("method.sensitivity", "exact", PROJECT, "the input gradient of the training forward (batch norm in train "
         "mode) at the final x', one extra backward", code=f"per-sample gradients in eval mode ({NB_LOSS}): this "
         "project's 'func' mode", methods=("dtrades",)),
    Note("training attack mode", "batch norm in eval mode during the training attack", REPORT_CODE,
         f"the text does not say; {NB_LOSS} attacks in eval mode, as the official TRADES code", field=False),
    Note("method.base", "trades", PROJECT, "the text gives FAAL only r = 0.1; trained from scratch with the TRADES "
         "loss (beta 4), as every other row (FAAL's official code fine-tunes an AT model)", methods=("faal",)),
    Note("baselines", "each method's own training attack (start and objective as its official code)", PROJECT,
         "the report shows no code for TRADES, MART or FAAL", field=False),
    Note("architectures", "ResNet-18 with a 3x3 stem; VGG-16 with batch norm; one input channel on MNIST",
         REPORT_CODE, "the text names ResNet-18 and VGG-16 only; Models/{resnet,vgg}.py and the notebooks' MNIST "
         "stems", field=False),
    Note("seed", 0, PROJECT, "one seed per cell, fixed", code="torch.manual_seed(1)"),
    Note("val_samples", 1000, PROJECT, "the last 1000 training images are held out (49,000 / 59,000 train) to "
         "validate each epoch and choose best.pt; the tables evaluate the last epoch", code="trains on all "
         "50,000 / 60,000 images and validates on the test set"),
    Note("evaluated checkpoint", "the last epoch's (final.pt)", REPORT_CODE, f"the text does not say; {NB_EVAL} "
         "evaluate model-nn-epoch100.pt / epoch50.pt", field=False),
    Note("amp", "auto", PROJECT, "bf16 autocast on a GPU (the attack's first step in fp32), fp32 on a CPU",
         code="fp32"),
    Note("eval.eps", 0.031, PROJECT, "the text gives no evaluation radius: every attack at the training radius",
         code=f"PGD-20 at 0.031, FGSM at 0.03, AutoAttack at 8/255 ({NB_EVAL})", datasets=("cifar10",)),
    Note("eval.eps", 0.3, PROJECT, "the text gives no evaluation radius: every attack at the training radius",
         code=f"PGD-20 at 0.3, FGSM at 0.03, AutoAttack at 8/255 ({NB_EVAL})", datasets=("mnist",)),
    Note("eval.pgd_step_size", 0.003, REPORT_CODE, f"the text gives PGD-20's steps only; {NB_EVAL}, as the official "
         "TRADES evaluation", datasets=("cifar10",)),
    Note("eval.pgd_step_size", 0.01, PROJECT, "the training attack's step (20 x 0.01 cannot cross the 0.3 ball; "
         "the evaluation flags it)", code=f"0.003 ({NB_EVAL}): 20 steps reach 0.06 from a uniform start",
         datasets=("mnist",)),
    Note("eval.pgd_random_start", "uniform", REPORT_CODE, f"the text does not say; {NB_EVAL}"),
    Note("eval.num_samples", None, REPORT_CODE, f"NA, FGSM and PGD-20 on the whole test set, as {NB_EVAL}"),
    Note("eval.aa_version", "standard", REPORT_CODE, f"the text names AutoAttack only; {NB_EVAL} runs the standard "
         "version"),
    Note("eval.aa_samples", 1000, REPORT_CODE, f"the first 1000 test images, as {NB_EVAL}"),
    Note("AutoAttack's RD", "NA on AutoAttack's own points minus its RA", REPORT_CODE, f"eq. 6.3 writes NA - RA; "
         f"{NB_EVAL} subtract from the NA of the 1000 attacked points", field=False),
)
NOTES: dict[str, tuple[Note, ...]] = {"paper": PAPER_NOTES}


def cell_in_report(dataset: str, row: str, arch: str) -> bool:
    """Whether the report's printed tables hold this cell (the rest are this project's additions)."""
    from recipes.published import report_cells   # the report's grid is its tables' data
    return (dataset, row, arch) in report_cells()


def protocol_notes(profile: str, dataset: str, row: str, arch: str) -> dict[str, Any]:
    """What a run's manifest records about its protocol: whether the cell is in the report's tables, and every
    note of the profile that covers it."""
    prof = PROFILES[profile]
    method = prof.rows[row].name
    notes = [n.as_dict() for n in NOTES.get(profile, ()) if n.covers(dataset, method)]
    return {"profile": profile, "cell_in_report": cell_in_report(dataset, row, arch),
            "cell": "in the report's tables" if cell_in_report(dataset, row, arch) else
            "this project's addition: not in the report's tables", "notes": notes}


def notes_markdown(profile: str) -> str:
    """A profile's notes as a table (README "Recipes" renders the paper profile's)."""
    from fastrobust.report import markdown_table

    def scope(n: Note) -> str:
        parts = [", ".join(DISPLAY.get(d, d) for d in n.datasets)] if n.datasets else []
        return ", ".join(parts + [f"{m} rows" for m in n.methods]) or "all"

    def shown(v: Any) -> str:
        return "none" if v is None else ", ".join(map(str, v)) if isinstance(v, tuple) else str(v)

    rows = [[f"`{n.setting}`" if n.field else n.setting, shown(n.value), scope(n), n.source, n.why, n.code or "—"]
            for n in NOTES.get(profile, ())]
    return markdown_table(["setting", "value", "cells", "source", "why", "the report's code, where it differs"], rows)
