"""Rules that find what cannot all be true in a report's printed tables, and where its text contradicts them.

Every rule takes the printed numbers (:class:`recipes.published.Published` records, any table of that
format) and returns :class:`Flag` records; none knows which numbers are wrong in the D-TRADES report.
A number printed with k decimals is known to half a unit of its last digit (``Published.half_unit``), and
two numbers disagree only beyond the sum of their half units: 0.015 for NA - RA = RD at two decimals.

Rules over the numbers:
  attack above NA          an attack's RA above NA (an attack cannot raise accuracy, unless it ran on
                           easier points than NA)
  stronger attack above    a stronger attack's RA above a weaker one's (the attacks registry's order:
                           FGSM < PGD < AutoAttack), under one threat model impossible
  RD is not NA - RA        the report defines RD = NA - RA (its eq. 6.3)
  ASR is not 100 - RA      and ASR = 1 - RA (eq. 6.4)
  row repeated             one dataset's half of a row, value for value, under two different models
  same model differs       one model's number printed differently in two tables
  printed against stored   a printed number against the repository's stored result of that model
  text against table       a claim of the text (:mod:`recipes.report_claims`) that its tables contradict

A claim is a :class:`Claim`: where the text says it, what it says (paraphrased), and a predicate over the
tables (:class:`Extreme`, :class:`Better`, :class:`Equals`, :class:`Gap`, :class:`Share`). A predicate names
tables, methods, datasets and attacks as the tables print them and fails early on a name the tables do
not hold, so a mistyped claim cannot pass silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from fastrobust.attacks import ATTACKS
from recipes.protocols import DISPLAY
from recipes.published import REPORT_ATTACK_LABELS, REPORT_ATTACKS, Published

HIGHER_IS_BETTER = {"na": True, "ra": True, "rd": False, "asr": False}
NUMERIC_SLACK = 1e-9   # float noise in sums of two-decimal numbers, far below any half unit
# weakest first, as the attacks registry orders them
STRENGTH = [name for ours in ATTACKS for name, mapped in REPORT_ATTACKS.items() if mapped == ours]


@dataclass(frozen=True)
class Flag:
    rule: str
    tables: tuple[str, ...]
    subject: str    # the model, or where the text says it
    detail: str     # the numbers
    cells: tuple[tuple[str, str, str], ...] = ()   # (dataset, row, arch) of the models concerned, if any

    def __str__(self) -> str:
        label = ("Table " if len(self.tables) == 1 else "Tables ") + ", ".join(self.tables)
        return f"{self.subject} ({label}): {self.detail}"


def _attack(name: str | None) -> str:
    return REPORT_ATTACK_LABELS.get(name, name or "")


def _column(dataset: str, metric: str, attack: str | None) -> str:
    return f"{DISPLAY.get(dataset, dataset)} {metric.upper()}" + (f" {_attack(attack)}" if attack else "")


def _model(r: Published) -> str:
    return f"{DISPLAY.get(r.dataset, r.dataset)}, {r.method}, {DISPLAY.get(r.arch, r.arch)}"


def _apart(a: Published, b: Published, difference: float) -> bool:
    return abs(difference) > a.half_unit + b.half_unit + NUMERIC_SLACK


def _merged(items: Iterable[tuple[str, tuple, str, str, str]]) -> list[Flag]:
    """(rule, model key, table, subject, detail) -> one Flag per (rule, model, detail), its tables together:
    a model printed in two tables (Table 6.1's alpha = beta = 1 row is Table 6.3's D-TRADES) is flagged once."""
    groups: dict[tuple, list] = {}
    for rule, key, table, subject, detail in items:
        groups.setdefault((rule, key, detail), []).append((table, subject))
    out = []
    for (rule, cell, detail), where in groups.items():
        tables = tuple(dict.fromkeys(t for t, _ in where))
        subject = min((s for _, s in where), key=len)   # the plainest method name the tables use
        out.append(Flag(rule, tables, subject, detail, (cell,)))
    return out


def _by_row(records: Sequence[Published]) -> dict[tuple[str, str, str], dict[tuple[str, str | None], Published]]:
    """(table, dataset, method) -> {(metric, attack): record}."""
    rows: dict = {}
    for r in records:
        rows.setdefault((r.table, r.dataset, r.method), {})[(r.metric, r.report_attack)] = r
    return rows


def attack_order_flags(records: Sequence[Published]) -> list[Flag]:
    """An attack's RA above NA, and a stronger attack's RA above a weaker one's."""
    items = []
    for (table, _, _), row in _by_row(records).items():
        na = row.get(("na", None))
        ras = [row[("ra", a)] for a in STRENGTH if ("ra", a) in row]
        for ra in ras:
            if na is not None and ra.value - na.value > 0 and _apart(ra, na, ra.value - na.value):
                items.append(("attack above NA", ra.cell, table, _model(ra),
                              f"{_attack(ra.report_attack)} RA {ra.text} above NA {na.text}: an attack cannot raise "
                              f"accuracy (unless it ran on easier points than NA)"))
        for i, weaker in enumerate(ras):
            for stronger in ras[i + 1:]:
                gap = stronger.value - weaker.value
                if gap > 0 and _apart(stronger, weaker, gap):
                    items.append(("stronger attack above weaker", stronger.cell, table, _model(stronger),
                                  f"{_attack(stronger.report_attack)} RA {stronger.text} above "
                                  f"{_attack(weaker.report_attack)} RA {weaker.text}: the stronger attack cannot "
                                  f"leave more points correct under one threat model"))
    return _merged(items)


def _na_ra(records: Sequence[Published]) -> dict[tuple, Published]:
    """(cell, metric, attack) -> the first printed NA or RA of that model (Tables 6.1-6.4 print them)."""
    out: dict = {}
    for r in records:
        if r.metric in ("na", "ra"):
            out.setdefault((r.cell, r.metric, r.report_attack), r)
    return out


def identity_flags(records: Sequence[Published]) -> list[Flag]:
    """RD = NA - RA and ASR = 100 - RA, each against the NA and RA printed for the same model."""
    na_ra = _na_ra(records)
    items = []
    for r in records:
        ra = na_ra.get((r.cell, "ra", r.report_attack))
        if r.metric == "rd" and ra is not None and (r.cell, "na", None) in na_ra:
            na = na_ra[(r.cell, "na", None)]
            expected = na.value - ra.value
            if abs(r.value - expected) > r.half_unit + na.half_unit + ra.half_unit + NUMERIC_SLACK:
                on_points = (f"; as NA - RA on AutoAttack's own points it implies an NA of {r.value + ra.value:.2f} "
                             f"there" if r.attack == "autoattack" else "")
                items.append(("RD is not NA - RA", r.cell, r.table, _model(r),
                              f"RD ({_attack(r.report_attack)}) {r.text}, but NA - RA = {na.text} - {ra.text} = "
                              f"{expected:.2f} (Table {na.table}){on_points}"))
        if r.metric == "asr" and ra is not None:
            expected = 100 - ra.value
            if abs(r.value - expected) > r.half_unit + ra.half_unit + NUMERIC_SLACK:
                items.append(("ASR is not 100 - RA", r.cell, r.table, _model(r),
                              f"ASR ({_attack(r.report_attack)}) {r.text}, but 100 - RA = 100 - {ra.text} = "
                              f"{expected:.2f} (Table {ra.table})"))
    return _merged(items)


def repeated_row_flags(records: Sequence[Published]) -> list[Flag]:
    """One dataset's half of a table row, every number equal, printed for two different models."""
    halves: dict[tuple, list[tuple[str, tuple, str]]] = {}
    for (table, dataset, method), row in _by_row(records).items():
        if len(row) < 2:   # a single number can coincide by chance
            continue
        first = next(iter(row.values()))
        signature = (dataset, tuple(sorted((k[0], k[1] or "", v.text) for k, v in row.items())))
        halves.setdefault(signature, []).append((table, first.cell, _model(first), [v.text for v in row.values()]))
    flags = []
    for (dataset, _), where in halves.items():
        cells = list(dict.fromkeys(c for _, c, _, _ in where))
        if len(cells) > 1:
            numbers = ", ".join(where[0][3])   # in the table's column order
            flags.append(Flag("row repeated", tuple(dict.fromkeys(t for t, _, _, _ in where)),
                              " and ".join(dict.fromkeys(s for _, _, s, _ in where)),
                              f"the {DISPLAY.get(dataset, dataset)} numbers are identical ({numbers}): one model's "
                              f"row printed for another", tuple(cells)))
    return flags


def same_model_flags(records: Sequence[Published]) -> list[Flag]:
    """One model's number printed differently in two tables."""
    seen: dict[tuple, Published] = {}
    flags = []
    for r in records:
        key = (r.cell, r.metric, r.report_attack)
        first = seen.setdefault(key, r)
        if first is not r and _apart(first, r, r.value - first.value):
            flags.append(Flag("same model differs", (first.table, r.table), _model(r),
                              f"{_column(r.dataset, r.metric, r.report_attack)} {first.text} in Table {first.table}, "
                              f"{r.text} in Table {r.table}", (r.cell,)))
    return flags


def stored_flags(printed: Sequence[Published], stored: Sequence[Published]) -> list[Flag]:
    """A printed number against the repository's stored result of the same model, metric and attack."""
    items = []
    for s in stored:
        if s.metric == "na" and s.report_attack is not None:
            continue   # NA on an attack's own points: the tables print no such number
        for p in printed:
            if (p.cell, p.metric, p.report_attack) == (s.cell, s.metric, s.report_attack) and \
                    _apart(p, s, p.value - s.value):
                items.append(("printed against stored", p.cell, p.table, _model(p),
                              f"{_column(p.dataset, p.metric, p.report_attack)} printed {p.text}, stored {s.text} "
                              f"({s.origin})"))
    return _merged(items)


# ------------------------------------------------------------------------------------- claims of the text
class PrintedTables:
    """The printed numbers by (table, dataset, method, metric, attack), in the report's own names."""

    def __init__(self, records: Sequence[Published]):
        self.records = tuple(records)
        self._at = {(r.table, r.dataset, r.method, r.metric, r.report_attack): r for r in self.records}

    def _holds(self, table: str, **fields) -> list[Published]:
        return [r for r in self.records if r.table == table and all(getattr(r, k) == v for k, v in fields.items())]

    def methods(self, table: str) -> list[str]:
        return list(dict.fromkeys(r.method for r in self._holds(table)))

    def columns(self, table: str, metric: str, datasets: Sequence[str] | None,
                attacks: Sequence[str] | None) -> list[tuple[str, str | None]]:
        """(dataset, attack) of every column of ``metric`` in ``table``, restricted to ``datasets`` and
        ``attacks``; a table, dataset or attack the table does not hold is an error."""
        have = self._holds(table, metric=metric)
        if not have:
            raise ValueError(f"Table {table} prints no {metric.upper()} numbers.")
        all_datasets = list(dict.fromkeys(r.dataset for r in have))
        all_attacks = list(dict.fromkeys(r.report_attack for r in have))
        for name, wanted, known in (("dataset", datasets, all_datasets), ("attack", attacks, all_attacks)):
            unknown = sorted(set(wanted or ()) - set(known))
            if unknown:
                raise ValueError(f"Table {table} {metric.upper()} has no {name} {', '.join(unknown)}.")
        return [(d, a) for d in all_datasets if not datasets or d in datasets
                for a in all_attacks if not attacks or a in attacks]

    def value(self, table: str, dataset: str, method: str, metric: str, attack: str | None) -> Published:
        key = (table, dataset, method, metric, None if metric == "na" else attack)
        if key not in self._at:
            raise ValueError(f"Table {table} prints no {_column(dataset, metric, attack)} for {method!r} "
                             f"(its rows: {', '.join(self.methods(table)) or 'none'}).")
        return self._at[key]


class Predicate(Protocol):
    tables: tuple[str, ...]

    def contradictions(self, t: PrintedTables) -> list[str]:
        """What in the tables contradicts the claim (empty: the tables bear it out)."""


def _where(table: str, dataset: str, metric: str, attack: str | None) -> str:
    return f"Table {table} {_column(dataset, metric, attack)}"


@dataclass(frozen=True)
class Extreme:
    """``method`` has the highest (``highest``) or lowest value of ``metric`` in every column, among the rows
    not in ``exclude``; ties do not contradict."""
    method: str
    metric: str
    tables: tuple[str, ...]
    highest: bool = True
    datasets: tuple[str, ...] | None = None
    attacks: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def contradictions(self, t: PrintedTables) -> list[str]:
        out = []
        for table in self.tables:
            for dataset, attack in t.columns(table, self.metric, self.datasets, self.attacks):
                mine = t.value(table, dataset, self.method, self.metric, attack)
                for other in t.methods(table):
                    if other in self.exclude or other == self.method:
                        continue
                    theirs = t.value(table, dataset, other, self.metric, attack)
                    if (theirs.value > mine.value) if self.highest else (theirs.value < mine.value):
                        out.append(f"{_where(table, dataset, self.metric, attack)}: {other} {theirs.text} "
                                   f"{'>' if self.highest else '<'} {self.method} {mine.text}")
        return out


@dataclass(frozen=True)
class Better:
    """Each of ``better`` is strictly better than each of ``worse`` in every column of ``metrics`` (higher NA
    and RA, lower RD and ASR)."""
    better: tuple[str, ...]
    worse: tuple[str, ...]
    metrics: tuple[str, ...]
    tables: tuple[str, ...]
    datasets: tuple[str, ...] | None = None
    attacks: tuple[str, ...] | None = None

    def contradictions(self, t: PrintedTables) -> list[str]:
        out = []
        for table in self.tables:
            for metric in self.metrics:
                attacks = None if metric == "na" else self.attacks
                for dataset, attack in t.columns(table, metric, self.datasets, attacks):
                    for b in self.better:
                        for w in self.worse:
                            vb = t.value(table, dataset, b, metric, attack)
                            vw = t.value(table, dataset, w, metric, attack)
                            wins = vb.value > vw.value if HIGHER_IS_BETTER[metric] else vb.value < vw.value
                            if not wins:
                                out.append(f"{_where(table, dataset, metric, attack)}: {b} {vb.text}, {w} {vw.text}")
        return out


@dataclass(frozen=True)
class Equals:
    """The text's number (as written) is the table's, within both roundings."""
    table: str
    dataset: str
    method: str
    metric: str
    attack: str | None
    stated: str

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.table,)

    def contradictions(self, t: PrintedTables) -> list[str]:
        printed = t.value(self.table, self.dataset, self.method, self.metric, self.attack)
        stated = _stated(self.stated)
        if abs(printed.value - stated.value) > printed.half_unit + stated.half_unit + NUMERIC_SLACK:
            return [f"the text gives {self.stated}, {_where(self.table, self.dataset, self.metric, self.attack)} "
                    f"prints {printed.text} for {self.method}"]
        return []


@dataclass(frozen=True)
class Gap:
    """``first`` - ``second`` lies in [``low``, ``high``] (``high`` None: equals ``low``) in every column, within
    the roundings of the printed numbers and of the text's."""
    tables: tuple[str, ...]
    dataset: str
    metric: str
    first: str
    second: str
    low: str
    high: str | None = None
    attacks: tuple[str, ...] | None = None

    def contradictions(self, t: PrintedTables) -> list[str]:
        low, high = _stated(self.low), _stated(self.high or self.low)
        out = []
        for table in self.tables:
            for dataset, attack in t.columns(table, self.metric, (self.dataset,), self.attacks):
                a = t.value(table, dataset, self.first, self.metric, attack)
                b = t.value(table, dataset, self.second, self.metric, attack)
                slack = a.half_unit + b.half_unit + NUMERIC_SLACK
                gap = a.value - b.value
                if gap < low.value - low.half_unit - slack or gap > high.value + high.half_unit + slack:
                    stated = self.low if self.high is None else f"{self.low} to {self.high}"
                    out.append(f"{_where(table, dataset, self.metric, attack)}: {self.first} - {self.second} = "
                               f"{a.text} - {b.text} = {gap:+.2f}, not {stated}")
        return out


@dataclass(frozen=True)
class Share:
    """In every column, more than half (``most``) or all of the rows not in ``exclude`` are above ``above``."""
    tables: tuple[str, ...]
    metric: str
    above: str
    most: bool = False
    datasets: tuple[str, ...] | None = None
    attacks: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def contradictions(self, t: PrintedTables) -> list[str]:
        threshold = float(self.above)
        out = []
        for table in self.tables:
            rows = [m for m in t.methods(table) if m not in self.exclude]
            for dataset, attack in t.columns(table, self.metric, self.datasets, self.attacks):
                values = {m: t.value(table, dataset, m, self.metric, attack) for m in rows}
                below = [f"{m} {v.text}" for m, v in values.items() if not v.value > threshold]
                above = len(rows) - len(below)
                if (above * 2 <= len(rows)) if self.most else below:
                    out.append(f"{_where(table, dataset, self.metric, attack)}: {above} of {len(rows)} above "
                               f"{self.above} (not above: {', '.join(below)})")
        return out


def _stated(text: str) -> Published:
    """A number of the text, with its precision, as a record (only ``text`` and ``half_unit`` are used)."""
    float(text)   # a claim's number must be a number
    return Published("text", None, "", "", "", "na", None, text.lstrip("+"), "")


@dataclass(frozen=True)
class Claim:
    where: str          # the section and paragraph of the report
    says: str           # what the text asserts, paraphrased
    check: Predicate


def claim_flags(claims: Sequence[Claim], records: Sequence[Published]) -> list[Flag]:
    """Every claim that the tables contradict, with the numbers that do."""
    tables = PrintedTables(records)
    flags = []
    for claim in claims:
        against = claim.check.contradictions(tables)
        if against:
            flags.append(Flag("text against table", tuple(claim.check.tables), claim.where,
                              f"the text says {claim.says}; but " + "; ".join(against)))
    return flags


RULES = ("attack above NA", "stronger attack above weaker", "RD is not NA - RA", "ASR is not 100 - RA",
         "row repeated", "same model differs", "printed against stored", "text against table")


def report_flags(printed: Sequence[Published], stored: Sequence[Published] = (),
                 claims: Sequence[Claim] = ()) -> list[Flag]:
    """Every rule over the printed numbers (and the stored results and the text's claims, where given), in
    the order of :data:`RULES`."""
    flags = (attack_order_flags(printed) + identity_flags(printed) + repeated_row_flags(printed)
             + same_model_flags(printed) + stored_flags(printed, stored) + claim_flags(claims, printed))
    return sorted(flags, key=lambda f: RULES.index(f.rule))
