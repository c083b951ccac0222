"""The D-TRADES report's own numbers, from two sources, as typed records for the tables' "report" columns.

report      The report's printed Tables 6.1-6.8: ``recipes/data/tables.csv``, a byte-for-byte copy of the
            table file that accompanies the report (232 numbers, as printed, bold marks dropped; a test
            compares the two). One number a line: ``table,arch,dataset,method,metric,attack,value_percent``.
repository  The evaluation results the report's repository stores (Jorgee18/Seminario, a different source):
            ``recipes/data/repository_results.csv``, one number a line with the file it comes from in
            ``source``: ``Resultado/{CIFAR-10,MNIST}/evaluate___*.csv`` at commit 6ac97c5 (the D-TRADES models;
            the folders labelled alpha1-beta1 hold alpha = beta = 1, the unlabelled ones alpha = beta = 0.5, as
            their numbers equal Tables 6.1/6.2's alpha = beta = 0.5 rows) and the printed output of
            ``Resultado/evaluate_attacks_cifar10.ipynb`` at 801747a (the standard VGG-16). Percentages at the
            stored precision (fractions x 100). ``na`` with an attack is the natural accuracy of that attack's
            own points (AutoAttack's first 1000 test images), from which that code subtracts AutoAttack's RA.

Both files use the report's names: methods as its tables print them (:data:`recipes.protocols.REPORT_ROWS`
maps them onto this project's rows), attacks ``fgsm``, ``pgd20``, ``autoattack`` (:data:`REPORT_ATTACKS`),
metrics ``na``, ``ra``, ``rd``, ``asr``; architectures and datasets are this project's registry names.

How the report's code evaluated (its notebooks), which is not this project's protocol: PGD-20 with step
0.003 and a uniform start on both datasets (MNIST included) at the training radius; FGSM at eps 0.03 on
both; AutoAttack standard at eps 8/255 on both (MNIST included) on the first 1000 test images; ASR =
1 - RA; the last epoch's checkpoint.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from loaders.errors import DataError
from recipes.protocols import REPORT_ROWS

DATA = Path(__file__).resolve().with_name("data")
PRINTED_CSV = DATA / "tables.csv"
STORED_CSV = DATA / "repository_results.csv"

PRINTED_SOURCE = "the report's printed Tables 6.1-6.8 (recipes/data/tables.csv)"
STORED_SOURCE = ("the report's repository's stored results (Jorgee18/Seminario Resultado/*.csv @ 6ac97c5 and one "
                 "notebook output @ 801747a; recipes/data/repository_results.csv)")
SOURCE = STORED_SOURCE   # the name this module used for its only source before the printed tables were read

# The report's names -> this project's: its methods as its tables print them (the rows' data, with the rows in
# recipes/protocols.py), and its attacks.
REPORT_ATTACKS = {"fgsm": "fgsm", "pgd20": "pgd", "autoattack": "autoattack"}
REPORT_ATTACK_LABELS = {"fgsm": "FGSM", "pgd20": "PGD-20", "autoattack": "AutoAttack"}   # as its tables head them
METRICS = ("na", "ra", "rd", "asr")
PRINTED_HEADER = ["table", "arch", "dataset", "method", "metric", "attack", "value_percent"]
STORED_HEADER = ["arch", "dataset", "method", "metric", "attack", "value_percent", "source"]


@dataclass(frozen=True)
class Published:
    """One published number: where it is printed or stored, what it measures, and its text as written."""
    source: str                 # "report" (printed tables) or "repository" (stored results)
    table: str | None           # "6.3" for a printed number; None for a stored one
    arch: str
    dataset: str
    method: str                 # as the report names it
    metric: str                 # na, ra, rd or asr
    report_attack: str | None   # fgsm, pgd20 or autoattack as the report names them; None for NA
    text: str                   # the number as written: "3.5", "0", "86.63"
    origin: str                 # the file (and line) it was read from

    @property
    def value(self) -> float:
        return float(self.text)

    @property
    def row(self) -> str:
        return REPORT_ROWS[self.method]

    @property
    def attack(self) -> str | None:
        """This project's name of the attack (None for NA)."""
        return None if self.report_attack is None else REPORT_ATTACKS[self.report_attack]

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.dataset, self.row, self.arch)

    @property
    def half_unit(self) -> float:
        """How far the true value can lie from the printed one: half a unit of the last printed digit. A
        whole number ("0", "100") stands in a two-decimal table with its zeros dropped: 0.005."""
        decimals = len(self.text.partition(".")[2])
        return 0.5 * 10 ** -(decimals or 2)


def _read(path: Path, header: list[str]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"published numbers not found: {path} (it ships with the recipes package).")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        head = next(reader, None)
        if head != header:
            raise DataError(f"{path}: header {head} is not the expected {header}.")
        return [(n, dict(zip(header, line))) for n, line in enumerate(reader, start=2) if line]


def _record(source: str, fields: dict[str, str], where: str, table: str | None) -> Published:
    from fastrobust.models import list_models
    from loaders import DATASETS

    def bad(what: str) -> DataError:
        return DataError(f"{where}: {what}")

    if fields["method"] not in REPORT_ROWS:
        raise bad(f"method {fields['method']!r} is none of the report's ({', '.join(REPORT_ROWS)}).")
    if fields["metric"] not in METRICS:
        raise bad(f"metric {fields['metric']!r} is none of {', '.join(METRICS)}.")
    if fields["dataset"] not in DATASETS or fields["arch"] not in list_models():
        raise bad(f"unknown dataset or architecture {fields['dataset']!r}, {fields['arch']!r}.")
    attack = fields["attack"] or None
    if attack is not None and attack not in REPORT_ATTACKS:
        raise bad(f"attack {attack!r} is none of the report's ({', '.join(REPORT_ATTACKS)}).")
    if fields["metric"] != "na" and attack is None:
        raise bad(f"metric {fields['metric']!r} needs an attack.")
    if fields["metric"] == "na" and attack is not None and source == "report":
        raise bad(f"a printed NA has no attack, got {attack!r}.")   # stored ones may: NA on that attack's points
    if not re.fullmatch(r"\d+(\.\d+)?", fields["value_percent"]) or not 0 <= float(fields["value_percent"]) <= 100:
        raise bad(f"value {fields['value_percent']!r} is not a percentage.")
    return Published(source, table, fields["arch"], fields["dataset"], fields["method"], fields["metric"], attack,
                     fields["value_percent"], fields.get("source") or where)


def _unique(records: list[Published], key, path: Path) -> tuple[Published, ...]:
    seen: dict = {}
    for r in records:
        if key(r) in seen:
            raise DataError(f"{path}: {key(r)} appears twice ({seen[key(r)].origin} and {r.origin}).")
        seen[key(r)] = r
    return tuple(records)


def load_printed(path: str | Path = PRINTED_CSV) -> tuple[Published, ...]:
    """The report's printed numbers, in the file's order (the tables' order)."""
    path = Path(path)
    records = []
    for n, fields in _read(path, PRINTED_HEADER):
        if not re.fullmatch(r"6\.[1-8]", fields["table"]):
            raise DataError(f"{path}:{n}: table {fields['table']!r} is not one of Tables 6.1-6.8.")
        records.append(_record("report", fields, f"{path.name}:{n}", fields["table"]))
    return _unique(records, lambda r: (r.table, r.dataset, r.method, r.metric, r.report_attack), path)


def load_stored(path: str | Path = STORED_CSV) -> tuple[Published, ...]:
    """The report's repository's stored results."""
    path = Path(path)
    records = [_record("repository", fields, f"{path.name}:{n}", None) for n, fields in _read(path, STORED_HEADER)]
    return _unique(records, lambda r: (r.arch, r.dataset, r.method, r.metric, r.report_attack), path)


PRINTED = load_printed()
STORED = load_stored()
_PRINTED_AT = {(r.table, r.dataset, r.row, r.arch, r.metric, r.attack): r for r in PRINTED}
_STORED_AT = {(r.dataset, r.row, r.arch, r.metric, r.attack): r for r in STORED}


def printed_value(table: str, dataset: str, row: str, arch: str, metric: str, attack: str | None) -> Published | None:
    """The report's printed number of one cell of Table ``table`` ("6.3"), in this project's names."""
    return _PRINTED_AT.get((table, dataset, row, arch, metric, None if metric == "na" else attack))


def stored_value(dataset: str, row: str, arch: str, metric: str, attack: str | None) -> Published | None:
    """The repository's stored number of one model (NA: on the whole test set)."""
    return _STORED_AT.get((dataset, row, arch, metric, None if metric == "na" else attack))


def report_cells() -> set[tuple[str, str, str]]:
    """(dataset, row, arch) of every model the report's tables hold: its grid."""
    return {r.cell for r in PRINTED}


def _seed_rows() -> dict[tuple[str, str, str], dict]:
    """The stored results in the shape the tables' repository checks read: na, ra/rd/asr per attack, aa_na."""
    out: dict[tuple[str, str, str], dict] = {}
    for r in STORED:
        entry = out.setdefault(r.cell, {"na": None, "ra": {}, "rd": {}, "asr": {}, "aa_na": None})
        if r.metric == "na":
            entry["na" if r.attack is None else "aa_na"] = r.value
        else:
            entry[r.metric][r.attack] = r.value
    return out


SEED = _seed_rows()
