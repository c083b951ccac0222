"""recipes.paper_tables: the paper's numbering and layout, our numbers beside the seed's with their difference,
the seed's inconsistencies flagged, and the NA-RA plot."""
import json
import re

import pytest

from recipes import paper_tables as pt
from recipes import run_dir
from recipes.protocols import DISPLAY as NAMES
from recipes.published import PRINTED, SEED, printed_value, stored_value


def _result(na, ra, n=1000, eps=0.031, passed=True):
    """A results.json entry in the format the trainer writes (fractions)."""
    return {"na": na, "ra": ra, "rd": {a: na - v for a, v in ra.items()}, "asr": {a: 1 - v for a, v in ra.items()},
            "conditional_asr": {a: (na - v) / na for a, v in ra.items()}, "n_attacked": {a: n for a in ra},
            "config": {"eps": eps}, "all_checks_passed": passed,
            "checks": [{"name": "ordering", "passed": passed, "detail": ""}]}


@pytest.fixture
def runs(tmp_path):
    ours = {("cifar10", "dtrades", "resnet18"): _result(0.85, {"fgsm": 0.55, "pgd": 0.45, "autoattack": 0.41}),
            ("cifar10", "dtrades_half", "resnet18"): _result(0.86, {"fgsm": 0.5, "pgd": 0.4, "autoattack": 0.36},
                                                             passed=False)}
    for cell, r in ours.items():
        path = run_dir(*cell, "paper", tmp_path) / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"_".join(cell): r}))
    return tmp_path


def _section(text, title):
    return text.split(f"## {title}")[1].split("\n## ")[0]


def test_tables_are_numbered_and_laid_out_as_the_paper(runs):
    text = pt.tables(pt.load(runs, "paper"), "paper")
    heads = re.findall(r"^## (Table 6\.\d):", text, flags=re.M)
    assert heads[:8] == [f"Table 6.{i}" for i in range(1, 9)]   # in the paper's order
    assert "ResNet-18, the D-TRADES ablation" in text.split("## Table 6.1")[1].splitlines()[0]
    assert "VGG-16, the D-TRADES ablation" in text.split("## Table 6.2")[1].splitlines()[0]
    assert "ResNet-18, natural and robust accuracy" in text and "VGG-16, robustness drop" in text
    ablation = _section(text, "Table 6.1:")
    rows = [line.split("|")[1].strip() for line in ablation.splitlines() if line.startswith("| dtrades")]
    assert rows == ["dtrades_half", "dtrades"]                    # alpha = beta = 0.5 against 1.0
    header = [line for line in ablation.splitlines() if line.startswith("| Row")][0]
    assert "CIFAR-10 NA" in header and "MNIST AA" in header
    asr = _section(text, "Table 6.7:")
    assert "CIFAR-10 AA cond." in asr                               # ASR with the conditional ASR
    assert "eps 0.031" in text.splitlines()[2] and "8/255" in text.splitlines()[2]   # the radius in the header


def test_our_cells_stand_beside_the_printed_number_with_the_difference(runs):
    text = pt.tables(pt.load(runs, "paper"), "paper")
    row = [line for line in _section(text, "Table 6.3:").splitlines() if line.startswith("| dtrades |")][0]
    printed = printed_value("6.3", "cifar10", "dtrades", "resnet18", "na", None)
    stored = stored_value("cifar10", "dtrades", "resnet18", "na", None)
    # the printed NA and the repository's stored one disagree (86.63 against 86.83): both, with their differences
    assert f"85.00 (report {printed.text}, Δ {85.0 - printed.value:+.2f}; repository {stored.text}, " \
           f"Δ {85.0 - stored.value:+.2f})" in row
    aa = printed_value("6.3", "cifar10", "dtrades", "resnet18", "ra", "autoattack")
    assert f"41.00 ± 1.6 (report {aa.text}, Δ {41.0 - aa.value:+.2f})" in row   # stored 40.0 agrees: not repeated
    assert "all passed" in row
    mnist_na = printed_value("6.3", "mnist", "dtrades", "resnet18", "na", None)
    assert f"{pt.MISSING} (report {mnist_na.text})" in row                      # not run yet: the printed number
    half = [line for line in _section(text, "Table 6.3:").splitlines() if line.startswith("| dtrades_half |")][0]
    assert "**FAILED**: ordering" in half and "report" not in half   # Table 6.3 prints no alpha = 0.5 row...
    assert "repository 85.28" in half                                # ...its repository stores one
    missing = [line for line in _section(text, "Table 6.3:").splitlines() if line.startswith("| at |")][0]
    assert missing.count(pt.MISSING) == 9 and "report" not in missing   # PGD-AT: not in the report


def test_all_printed_numbers_stand_beside_their_cells_and_only_with_the_paper_profile(tmp_path):
    text = pt.tables({}, "paper")
    for r in PRINTED:
        section = _section(text, f"Table {r.table}:")
        line = next(line for line in section.splitlines() if line.startswith(f"| {r.row} |"))
        header = next(line for line in section.splitlines() if line.startswith("| Row |"))
        column = f"{NAMES[r.dataset]} " + ("NA" if r.metric == "na" else pt.LABELS[r.attack])
        cell = line.split(" | ")[[h.strip() for h in header.split("|")].index(column) - 1]
        assert f"(report {r.text}" in cell, (r, cell)
    assert len(re.findall(r"\(report ", text.split("## The report's")[0])) == len(PRINTED) == 232
    for profile in ("official", "cpu"):
        assert "(report " not in pt.tables({}, profile) and "inconsistencies" not in pt.tables({}, profile)


def test_a_cell_shows_the_stored_number_only_where_it_disagrees_with_the_printed_one():
    ours = {"na": 0.8}
    printed = printed_value("6.3", "cifar10", "trades", "resnet18", "na", None)
    assert pt.cell_text(ours, printed, None, "na") == f"80.00 (report {printed.text}, Δ {80.0 - printed.value:+.2f})"
    agreeing = stored_value("cifar10", "dtrades", "resnet18", "ra", "autoattack")   # "40.0" against "40.00"
    disagreeing = stored_value("cifar10", "dtrades", "resnet18", "na", None)
    aa = printed_value("6.3", "cifar10", "dtrades", "resnet18", "ra", "autoattack")
    na = printed_value("6.3", "cifar10", "dtrades", "resnet18", "na", None)
    assert "repository" not in pt.cell_text(None, aa, agreeing, "ra", "autoattack")
    assert pt.cell_text(None, na, disagreeing, "na") == f"{pt.MISSING} (report 86.63; repository 86.83)"


def test_the_reports_inconsistencies_are_listed_under_the_paper_tables():
    text = pt.tables({}, "paper")
    flags = _section(text, "The report's inconsistencies")
    for rule in ("stronger attack above weaker", "RD is not NA - RA", "row repeated", "text against table",
                 "printed against stored"):
        assert f"**{rule}**" in flags
    assert "MNIST, D-TRADES, ResNet-18 (Tables 6.1, 6.3): AutoAttack RA 98.90 above PGD-20 RA 81.56" in flags
    assert flags.count("\n- ") == len(pt.report_inconsistencies())


def test_the_seeds_inconsistencies_are_flagged():
    flags = pt.seed_inconsistencies()
    assert any("MNIST dtrades ResNet-18: AutoAttack RA 98.90 above PGD-20 RA 81.56" in f for f in flags)
    assert any("CIFAR-10 dtrades ResNet-18: RD (AA) 47.70 where NA - RA = 86.83 - 40.00 = 46.83" in f
               and "AutoAttack subset" in f for f in flags)


def test_a_row_copied_between_tables_is_flagged():
    seed = {("cifar10", "dtrades", "resnet18"): dict(SEED[("cifar10", "dtrades", "resnet18")]),
            ("cifar10", "dtrades", "vgg16"): dict(SEED[("cifar10", "dtrades", "vgg16")])}
    assert not any("identical" in f for f in pt.seed_inconsistencies(seed))
    seed[("cifar10", "dtrades", "vgg16")]["rd"] = dict(seed[("cifar10", "dtrades", "resnet18")]["rd"])
    assert any("RD row is identical for ResNet-18 and VGG-16" in f for f in pt.seed_inconsistencies(seed))


def test_the_cpu_profile_gets_the_same_layouts_and_a_pareto_plot(tmp_path):
    cell = ("mnist", "trades", "smallcnn")
    path = run_dir(*cell, "cpu", tmp_path) / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"x": _result(0.98, {"fgsm": 0.9, "pgd": 0.85, "autoattack": 0.8}, n=200, eps=0.1)}))
    assert pt.main(["--profile", "cpu", "--runs", str(tmp_path)]) == 0
    text = (tmp_path / "paper_tables_cpu.md").read_text()
    assert "Table 6.3 layout: SmallCNN, natural and robust accuracy" in text and "MNIST eps 0.1" in text
    assert "80.00 ± 2.8" in text   # AutoAttack on 200 points: its standard error is shown
    assert (tmp_path / "paper_tables_cpu_pareto.png").stat().st_size > 1000
