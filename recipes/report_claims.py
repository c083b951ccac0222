"""What the D-TRADES report's text (chapter 6) says about its own Tables 6.1-6.8, as checkable claims.

Data about the report, not logic: each :class:`~recipes.report_checks.Claim` gives the section and
paragraph, the assertion paraphrased in English, and a predicate over the printed tables in the names the
tables use (methods as printed; datasets; attacks ``fgsm``, ``pgd20``, ``autoattack``).
:func:`recipes.report_checks.claim_flags` evaluates them; a claim the tables contradict is flagged with the
numbers, one that they bear out is silent. Where the text scopes a claim ("on CIFAR-10"), the predicate
keeps that scope; where it does not, the predicate covers every dataset. Section 6.5.3 sets MNIST's
AutoAttack column aside for the earlier sections' comparisons, so claims about MNIST rankings cover FGSM
and PGD-20 only.
"""
from __future__ import annotations

from recipes.report_checks import Better, Claim, Equals, Extreme, Gap, Share

ALPHA_1 = "D-TRADES alpha=1.0 beta=1.0"     # Tables 6.1/6.2's rows, as printed
ALPHA_HALF = "D-TRADES alpha=0.5 beta=0.5"
DTRADES = "D-TRADES"                        # Tables 6.3-6.8's row (the alpha = beta = 1 model)
STANDARD = "Standard"                       # not a defence: the text's rankings leave it out
ROBUST_COLUMNS = ("fgsm", "pgd20")          # the columns Section 6.5.3 keeps for MNIST

CLAIMS = (
    # 6.4: the alpha/beta choice
    Claim("Section 6.4, paragraph on Tables 6.1 and 6.2",
          "that on CIFAR-10 alpha = beta = 1 is better than 0.5 in natural accuracy and systematically better "
          "against FGSM, PGD-20 and AutoAttack",
          Better((ALPHA_1,), (ALPHA_HALF,), ("na", "ra"), ("6.1", "6.2"), datasets=("cifar10",))),
    Claim("Section 6.4, paragraph on Tables 6.1 and 6.2",
          "that alpha = beta = 1 gains 20 to 25 points of robust accuracy under PGD-20 and AutoAttack with "
          "ResNet-18 on CIFAR-10",
          Gap(("6.1",), "cifar10", "ra", ALPHA_1, ALPHA_HALF, "20", "25", attacks=("pgd20", "autoattack"))),
    Claim("Section 6.4, paragraph on Tables 6.1 and 6.2",
          "that alpha = beta = 1 gains 23 to 28 points of robust accuracy under PGD-20 and AutoAttack with "
          "VGG-16 on CIFAR-10",
          Gap(("6.2",), "cifar10", "ra", ALPHA_1, ALPHA_HALF, "23", "28", attacks=("pgd20", "autoattack"))),
    Claim("Section 6.4, closing summary",
          "that alpha = beta = 1 obtained higher natural accuracy and higher robustness against the evaluated "
          "attacks than alpha = beta = 0.5 (particularly, not only, on CIFAR-10), hence its choice",
          Better((ALPHA_1,), (ALPHA_HALF,), ("na", "ra"), ("6.1", "6.2"))),
    # 6.5.1: NA and RA
    Claim("Sections 6.4 and 6.5.1, first paragraph",
          "that D-TRADES reaches 86.63% natural accuracy with ResNet-18 on CIFAR-10",
          Equals("6.3", "cifar10", DTRADES, "na", None, "86.63")),
    Claim("Sections 6.4 and 6.5.1, first paragraph",
          "that D-TRADES reaches 85.70% natural accuracy with VGG-16 on CIFAR-10",
          Equals("6.4", "cifar10", DTRADES, "na", None, "85.70")),
    Claim("Section 6.5.1, first and closing paragraphs; Section 6.6, first paragraph",
          "that D-TRADES has the best natural accuracy of the defences evaluated, on CIFAR-10 and on MNIST, "
          "above TRADES, MART and FAAL",
          Extreme(DTRADES, "na", ("6.3", "6.4"), exclude=(STANDARD,))),
    Claim("Section 6.5.1, first paragraph",
          "that D-TRADES is 2.65 points above the second best, TRADES, in natural accuracy with ResNet-18 on "
          "CIFAR-10",
          Gap(("6.3",), "cifar10", "na", DTRADES, "TRADES", "2.65")),
    Claim("Section 6.5.1, first paragraph",
          "that D-TRADES is 4.08 points above TRADES in natural accuracy with VGG-16 on CIFAR-10",
          Gap(("6.4",), "cifar10", "na", DTRADES, "TRADES", "4.08")),
    Claim("Section 6.5.1, first paragraph",
          "that every defence's natural accuracy on MNIST is above 99.00%",
          Share(("6.3", "6.4"), "na", "99.00", datasets=("mnist",), exclude=(STANDARD,))),
    Claim("Section 6.5.1, second paragraph",
          "that on CIFAR-10 D-TRADES has the lowest robust accuracy of the defences under all three attacks, "
          "with ResNet-18 and again with VGG-16",
          Extreme(DTRADES, "ra", ("6.3", "6.4"), highest=False, datasets=("cifar10",), exclude=(STANDARD,))),
    Claim("Section 6.5.1, second paragraph",
          "that MART has the best FGSM and PGD-20 robust accuracy with ResNet-18 on CIFAR-10",
          Extreme("MART", "ra", ("6.3",), datasets=("cifar10",), attacks=ROBUST_COLUMNS)),
    Claim("Section 6.5.1, second paragraph",
          "that TRADES has the best AutoAttack robust accuracy with ResNet-18 on CIFAR-10",
          Extreme("TRADES", "ra", ("6.3",), datasets=("cifar10",), attacks=("autoattack",))),
    Claim("Section 6.5.1, second paragraph",
          "that D-TRADES is 6.51 points below MART under FGSM with ResNet-18 on CIFAR-10",
          Gap(("6.3",), "cifar10", "ra", DTRADES, "MART", "-6.51", attacks=("fgsm",))),
    Claim("Section 6.5.1, second paragraph",
          "that D-TRADES is 8.28 points below MART under PGD-20 with ResNet-18 on CIFAR-10",
          Gap(("6.3",), "cifar10", "ra", DTRADES, "MART", "-8.28", attacks=("pgd20",))),
    Claim("Section 6.5.1, second paragraph",
          "that D-TRADES is 6.80 points below TRADES under AutoAttack with ResNet-18 on CIFAR-10",
          Gap(("6.3",), "cifar10", "ra", DTRADES, "TRADES", "-6.80", attacks=("autoattack",))),
    Claim("Section 6.5.1, second and closing paragraphs",
          "that on MNIST D-TRADES ranks below FAAL and MART in robust accuracy (FGSM and PGD-20)",
          Better(("FAAL", "MART"), (DTRADES,), ("ra",), ("6.3", "6.4"), datasets=("mnist",), attacks=ROBUST_COLUMNS)),
    # 6.5.2: RD
    Claim("Section 6.5.2, first paragraph",
          "that on CIFAR-10 D-TRADES has the highest robustness drop of the defences under all three attacks, "
          "with ResNet-18 and with VGG-16",
          Extreme(DTRADES, "rd", ("6.5", "6.6"), datasets=("cifar10",), exclude=(STANDARD,))),
    Claim("Section 6.5.2, first paragraph",
          "that D-TRADES's CIFAR-10 robustness drop is 33.93% under FGSM",
          Equals("6.5", "cifar10", DTRADES, "rd", "fgsm", "33.93")),
    Claim("Section 6.5.2, first paragraph",
          "that D-TRADES's CIFAR-10 robustness drop is 41.44% under PGD-20",
          Equals("6.5", "cifar10", DTRADES, "rd", "pgd20", "41.44")),
    Claim("Section 6.5.2, first paragraph",
          "that D-TRADES's CIFAR-10 robustness drop is 40.77% under AutoAttack",
          Equals("6.5", "cifar10", DTRADES, "rd", "autoattack", "40.77")),
    Claim("Section 6.5.2, first and closing paragraphs",
          "that on MNIST D-TRADES's robustness drop stays behind (above) FAAL's and MART's (FGSM and PGD-20)",
          Better(("FAAL", "MART"), (DTRADES,), ("rd",), ("6.5", "6.6"), datasets=("mnist",), attacks=ROBUST_COLUMNS)),
    # 6.6: discussion
    Claim("Section 6.6, first paragraph",
          "that D-TRADES stands out as the defence with the largest robustness drop (FGSM and PGD-20, both "
          "datasets)",
          Extreme(DTRADES, "rd", ("6.5", "6.6"), attacks=ROBUST_COLUMNS, exclude=(STANDARD,))),
    Claim("Section 6.6, first paragraph",
          "that D-TRADES stands out as the defence with the largest attack success rate (FGSM and PGD-20, both "
          "datasets)",
          Extreme(DTRADES, "asr", ("6.7", "6.8"), attacks=ROBUST_COLUMNS, exclude=(STANDARD,))),
    Claim("Section 6.6, third paragraph",
          "that on MNIST most defences reach robust accuracy above 90% (FGSM and PGD-20)",
          Share(("6.3", "6.4"), "ra", "90", most=True, datasets=("mnist",), attacks=ROBUST_COLUMNS,
                exclude=(STANDARD,))),
)
