"""recipes.published: the report's printed tables ship with the package, byte for byte the report's file, and
load into typed records in this project's names; the repository's stored results load the same way; bad
files fail early, naming the line."""
import dataclasses
import os
import re
from pathlib import Path

import pytest

from fastrobust.attacks import ATTACKS
from loaders.errors import DataError
from recipes import published
from recipes.protocols import PAPER_ROWS

REPO = Path(__file__).resolve().parents[1]


def _report_tables_file() -> Path:
    env = os.environ.get("FASTROBUST_DATA")
    candidates = ([Path(env).parent / "seed" / "tables.csv"] if env else []) + \
        [REPO.parent / "shared" / "seed" / "tables.csv"]
    return next((p for p in candidates if p.is_file()), candidates[-1])


def test_the_package_copy_is_the_reports_table_file_byte_for_byte():
    original = _report_tables_file()
    if not original.is_file():
        pytest.skip(f"the report's table file is not on this machine ({original}); nothing to compare with")
    assert published.PRINTED_CSV.read_bytes() == original.read_bytes()


def test_the_package_ships_its_data_files():
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert re.search(r'recipes\s*=\s*\[[^]]*"data/\*\.csv"', section)
    assert published.PRINTED_CSV.parent == REPO / "recipes" / "data" and published.STORED_CSV.is_file()


def test_every_printed_number_is_a_typed_record_in_this_projects_names():
    lines = published.PRINTED_CSV.read_text().splitlines()[1:]
    assert len(published.PRINTED) == len(lines) == 232
    for record, line in zip(published.PRINTED, lines):
        assert line.endswith("," + record.text)                 # the number as printed, "3.6" not "3.60"
        assert record.row in PAPER_ROWS and (record.attack is None) == (record.metric == "na")
        assert record.attack is None or record.attack in ATTACKS
    row = published.printed_value("6.3", "cifar10", "dtrades", "resnet18", "na", None)
    assert (row.text, row.method, row.table) == ("86.63", "D-TRADES", "6.3")
    assert published.printed_value("6.1", "mnist", "dtrades_half", "resnet18", "ra", "pgd").value == 97.27
    assert published.printed_value("6.3", "mnist", "at", "resnet18", "na", None) is None   # not in the report


def test_the_report_names_map_onto_rows_with_the_same_options():
    """A "D-TRADES alpha=a beta=b" row of the report maps onto the row whose method has those options."""
    for name, row in published.REPORT_ROWS.items():
        method = PAPER_ROWS[row]
        assert method.name == re.sub(r"[^a-z]", "", name.split()[0].lower())
        for option, value in re.findall(r"(\w+)=([\d.]+)", name):
            assert getattr(method, option) == float(value), (name, row)
    assert set(published.REPORT_ATTACKS.values()) == set(ATTACKS)


def test_half_units_follow_the_printed_precision():
    at = {r.text: r.half_unit for r in published.PRINTED}
    assert at["86.63"] == pytest.approx(0.005) and at["3.6"] == pytest.approx(0.05)
    assert at["0"] == pytest.approx(0.005)   # "0" and "100" stand in two-decimal tables with their zeros dropped


def test_the_stored_results_load_with_their_source_and_disagree_where_known():
    stored = published.stored_value("cifar10", "dtrades", "resnet18", "na", None)
    assert stored.text == "86.83" and "alpha1-beta1" in stored.origin and "6ac97c5" in stored.origin
    assert published.SEED[("cifar10", "dtrades", "resnet18")]["aa_na"] == 87.7   # NA of AutoAttack's 1000 points
    assert {r.cell for r in published.STORED} <= published.report_cells()


@pytest.mark.parametrize("change, message", [
    (lambda line: line.replace("D-TRADES,", "DTRADES,"), "method 'DTRADES'"),
    (lambda line: line.replace(",ra,fgsm,", ",ra,,"), "needs an attack"),
    (lambda line: line.replace(",fgsm,", ",pgd7,"), "attack 'pgd7'"),
    (lambda line: line.replace(",99.30", ",9x.30"), "not a percentage"),
    (lambda line: line.replace("6.3,", "6.9,", 1), "Tables 6.1-6.8"),
])
def test_a_bad_line_fails_naming_it(tmp_path, change, message):
    lines = published.PRINTED_CSV.read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if line.startswith("6.3,resnet18,mnist,D-TRADES,ra,fgsm"))
    lines[target] = change(lines[target])
    path = tmp_path / "tables.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"tables.csv:{target + 1}: .*{re.escape(message)}"):
        published.load_printed(path)


def test_a_repeated_number_or_a_wrong_header_fails(tmp_path):
    lines = published.PRINTED_CSV.read_text().splitlines()
    (tmp_path / "twice.csv").write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DataError, match="appears twice"):
        published.load_printed(tmp_path / "twice.csv")
    (tmp_path / "head.csv").write_text("\n".join(["table,arch"] + lines[1:]) + "\n")
    with pytest.raises(DataError, match="header"):
        published.load_printed(tmp_path / "head.csv")
    with pytest.raises(DataError, match="not found"):
        published.load_printed(tmp_path / "absent.csv")


def test_records_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        published.PRINTED[0].text = "1"
