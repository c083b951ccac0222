"""The seed's own numbers, for the tables' "seed" column, with where each comes from.

The D-TRADES seed is a final-year project (repository Jorgee18/Seminario). Its report's printed Tables
6.1-6.8 are in a PDF whose text could not be read, so these are the evaluation results its repository
stores: ``Resultado/{CIFAR-10,MNIST}/evaluate___*.csv`` at commit 6ac97c503db19dc1ada590fa3e69fc0c2e15c2ed
(the D-TRADES models of the folders labelled alpha1-beta1), and one printed notebook output
(``Resultado/evaluate_attacks_cifar10.ipynb`` at 801747a2b42777caec2068f4969f084e6fd3fbc6, standard
VGG-16). Only these models' results are stored there; every other cell has no published number here.

How the seed's code evaluated (read from its notebooks), which is not this project's protocol: PGD-20
with step 0.003 on both datasets (MNIST included) at the training radius; FGSM at eps 0.03 on both
datasets; AutoAttack standard at eps 8/255 on both datasets (MNIST included), on the first 1000 test
images, with that subset's own natural accuracy ``aa_na``; ASR = 1 - RA; the last epoch's checkpoint.
Values are percentages, as stored (fractions x 100).
"""
from __future__ import annotations

SOURCE = ("the seed repository's stored results (Jorgee18/Seminario Resultado/*.csv @ 6ac97c5; its report's "
          "printed tables could not be read)")


def _row(na, fgsm, pgd, aa, rd_fgsm, rd_pgd, rd_aa, aa_na):
    return {"na": na, "ra": {"fgsm": fgsm, "pgd": pgd, "autoattack": aa},
            "rd": {"fgsm": rd_fgsm, "pgd": rd_pgd, "autoattack": rd_aa},
            "asr": {"fgsm": 100 - fgsm, "pgd": 100 - pgd, "autoattack": 100 - aa}, "aa_na": aa_na}


#                                            NA    FGSM   PGD-20  AA    RD: FGSM PGD-20 AA   AA-subset NA
SEED = {
    ("cifar10", "dtrades", "resnet18"): _row(86.83, 52.90, 45.39, 40.0, 33.93, 41.44, 47.70, 87.7),
    ("cifar10", "dtrades", "vgg16"):    _row(85.70, 47.56, 40.15, 32.5, 38.14, 45.55, 53.90, 86.4),
    ("cifar10", "standard", "vgg16"):   _row(92.19, 20.52, 1.88, 0.0, 71.67, 90.31, 92.60, 92.6),
    ("mnist", "dtrades", "resnet18"):   _row(99.45, 99.30, 81.56, 98.9, 0.15, 17.89, 0.50, 99.4),
    ("mnist", "dtrades", "vgg16"):      _row(99.48, 99.26, 92.81, 98.7, 0.22, 6.67, 0.30, 99.0),
}
