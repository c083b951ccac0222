"""recipes.report_checks: each rule finds the report's known inconsistencies in its real printed tables, fires
exactly where one is planted in a small synthetic table, and stays silent on a consistent one; the text's
claims are checked against the tables, and a claim naming something the tables lack fails early."""
import pytest

from recipes import report_checks as rc
from recipes.published import PRINTED, STORED, Published
from recipes.report_claims import ALPHA_1, ALPHA_HALF, CLAIMS

# ------------------------------------------------------------------------------ the real printed tables
FLAGS = rc.report_flags(PRINTED, STORED, CLAIMS)


def _of(rule):
    return [f for f in FLAGS if f.rule == rule]


def test_every_mnist_row_has_autoattack_above_pgd_and_no_cifar_row_has():
    flagged = {c for f in _of("stronger attack above weaker") if "above PGD-20" in f.detail for c in f.cells}
    mnist_models = {r.cell for r in PRINTED if r.dataset == "mnist" and r.metric == "ra"}
    assert flagged == mnist_models and len(mnist_models) == 12      # 6 rows x 2 architectures
    assert not [f for f in FLAGS if f.rule.startswith(("stronger", "attack above")) and "CIFAR-10" in f.subject]
    both = [f for f in _of("stronger attack above weaker") if f.cells == (("mnist", "dtrades", "resnet18"),)]
    assert both[0].tables == ("6.1", "6.3")    # one model, printed in two tables, flagged once
    assert [f.cells for f in _of("attack above NA")] == [(("mnist", "mart", "vgg16"),)]   # AA 99.70 > NA 99.54


def test_the_copied_rd_row_and_its_consequences_are_found():
    repeats = _of("row repeated")
    assert {f.tables for f in repeats} == {("6.5", "6.6")} and len(repeats) == 2   # both datasets' halves
    assert all(set(f.cells) == {(d, "dtrades", "resnet18"), (d, "dtrades", "vgg16")}
               for f, d in zip(sorted(repeats, key=lambda f: f.cells), ("cifar10", "mnist")))
    rd = [str(f) for f in _of("RD is not NA - RA")]
    assert any("CIFAR-10, D-TRADES, ResNet-18" in f and "86.63 - 52.90 = 33.73" in f for f in rd)   # the 86.63 typo
    assert any("MNIST, D-TRADES, VGG-16" in f and "RD (PGD-20) 17.89" in f and "= 6.67" in f for f in rd)
    assert any("ASR (AutoAttack) 0.13" in str(f) for f in _of("ASR is not 100 - RA"))
    assert not _of("same model differs")   # Table 6.1's alpha = beta = 1 rows are Table 6.3's D-TRADES


def test_the_printed_na_against_the_stored_one():
    na = [f for f in _of("printed against stored") if "NA printed" in f.detail]
    assert len(na) == 1 and na[0].tables == ("6.1", "6.3") and "printed 86.63, stored 86.83" in na[0].detail


def test_the_texts_contradicted_claims_are_flagged_and_the_borne_out_ones_are_not():
    text = _of("text against table")
    flagged = {f.subject + " | " + f.detail.split("; but ")[0] for f in text}
    by_says = {c.says: c for c in CLAIMS}

    def fired(fragment):
        return [f for f in text if fragment in f.detail]

    assert fired("best natural accuracy") and "MART 99.56 > D-TRADES 99.45" in fired("best natural accuracy")[0].detail
    summary = fired("hence its choice")[0].detail
    assert "MNIST RA PGD-20: D-TRADES alpha=1.0 beta=1.0 81.56, D-TRADES alpha=0.5 beta=0.5 97.27" in summary
    assert "prints 47.77" in fired("40.77%")[0].detail
    quiet = [s for s in by_says if not fired(s)]
    assert any("systematically better" in s for s in quiet)        # on CIFAR-10 alpha = 1 does win everywhere
    assert any("86.63%" in s for s in quiet) and any("2.65 points" in s for s in quiet)
    assert len(text) == len(flagged) < len(CLAIMS)


# ------------------------------------------------------------------------------ a synthetic table
# (arch, dataset, method) -> NA, FGSM, PGD-20, AutoAttack: every ordering holds, every number distinct
MODELS = {
    ("resnet18", "mnist", "TRADES"): (99.10, 95.20, 90.30, 88.40),
    ("resnet18", "mnist", "D-TRADES"): (99.30, 94.10, 87.60, 85.90),
    ("vgg16", "mnist", "TRADES"): (98.70, 93.80, 89.10, 86.70),
    ("vgg16", "mnist", "D-TRADES"): (98.90, 92.40, 86.20, 84.30),
}
TABLE = {"resnet18": ("6.3", "6.5", "6.7"), "vgg16": ("6.4", "6.6", "6.8")}
ATTACKS = ("fgsm", "pgd20", "autoattack")


def _rec(table, arch, dataset, method, metric, attack, value):
    text = value if isinstance(value, str) else f"{value:.2f}"
    return Published("report", table, arch, dataset, method, metric, attack, text, "synthetic")


def synthetic(models=MODELS):
    """Tables 6.3-6.8 of ``models``, RD and ASR derived from NA and RA, as a report would print them."""
    out = []
    for (arch, dataset, method), (na, *ras) in models.items():
        t_ra, t_rd, t_asr = TABLE[arch]
        out.append(_rec(t_ra, arch, dataset, method, "na", None, na))
        out += [_rec(t_ra, arch, dataset, method, "ra", a, v) for a, v in zip(ATTACKS, ras)]
        out += [_rec(t_rd, arch, dataset, method, "rd", a, na - v) for a, v in zip(ATTACKS, ras)]
        out += [_rec(t_asr, arch, dataset, method, "asr", a, 100 - v) for a, v in zip(ATTACKS, ras)]
    return out


def _replace(records, table, method, metric, attack, text):
    hits = [i for i, r in enumerate(records)
            if (r.table, r.method, r.metric, r.report_attack) == (table, method, metric, attack)]
    assert len(hits) == 1
    r = records[hits[0]]
    records[hits[0]] = _rec(r.table, r.arch, r.dataset, r.method, r.metric, r.report_attack, text)
    return records


def _fired(records, stored=(), claims=()):
    return {(f.rule, f.tables, f.cells) for f in rc.report_flags(records, stored, claims)}


def test_a_consistent_table_raises_no_flag():
    records = synthetic()
    stored = [Published("repository", None, r.arch, r.dataset, r.method, r.metric, r.report_attack, r.text, "s")
              for r in records]
    assert _fired(records, stored) == set()


def test_an_autoattack_ra_above_pgd_and_above_na_fire_exactly_there():
    models = dict(MODELS)
    models[("vgg16", "mnist", "TRADES")] = (98.70, 93.80, 89.10, 91.50)   # AutoAttack above PGD-20 only
    models[("resnet18", "mnist", "TRADES")] = (99.10, 95.20, 90.30, 99.40)   # above every attack and NA
    cell_v, cell_r = ("mnist", "trades", "vgg16"), ("mnist", "trades", "resnet18")
    assert _fired(synthetic(models)) == {
        ("stronger attack above weaker", ("6.4",), (cell_v,)),
        ("stronger attack above weaker", ("6.3",), (cell_r,)),      # above PGD-20 and above FGSM: two flags,
        ("attack above NA", ("6.3",), (cell_r,))}                   # one set entry
    assert len([f for f in rc.report_flags(synthetic(models)) if f.cells == (cell_r,)]) == 3


def test_a_difference_within_rounding_does_not_fire():
    models = dict(MODELS)
    models[("vgg16", "mnist", "TRADES")] = (98.70, 93.80, 89.10, 89.105)   # equal to PGD-20 at two decimals
    assert _fired(synthetic(models)) == set()


def test_an_rd_or_asr_off_its_identity_fires_exactly_there():
    records = _replace(synthetic(), "6.5", "D-TRADES", "rd", "pgd20", "11.73")   # NA - RA = 11.70
    records = _replace(records, "6.8", "TRADES", "asr", "autoattack", "13.3")    # 100 - RA = 13.30: within rounding
    assert _fired(records) == {("RD is not NA - RA", ("6.5",), (("mnist", "dtrades", "resnet18"),))}
    records = _replace(records, "6.8", "TRADES", "asr", "autoattack", "12.3")
    assert ("ASR is not 100 - RA", ("6.8",), (("mnist", "trades", "vgg16"),)) in _fired(records)


def test_a_row_copied_into_another_table_fires_once_with_both_tables():
    records = synthetic()
    for attack in ATTACKS:
        source = next(r for r in records if (r.table, r.method, r.metric, r.report_attack) ==
                      ("6.5", "D-TRADES", "rd", attack))
        records = _replace(records, "6.6", "D-TRADES", "rd", attack, source.text)
    fired = _fired(records)
    copied = {f for f in fired if f[0] == "row repeated"}
    both = (("mnist", "dtrades", "resnet18"), ("mnist", "dtrades", "vgg16"))
    assert copied == {("row repeated", ("6.5", "6.6"), both)}
    assert {f[2] for f in fired if f[0] == "RD is not NA - RA"} == {(("mnist", "dtrades", "vgg16"),)}


def test_the_same_model_printed_twice_fires_only_when_the_numbers_differ():
    records = synthetic()
    ablation = [_rec("6.1", r.arch, r.dataset, ALPHA_1, r.metric, r.report_attack, r.text) for r in records
                if r.table == "6.3" and r.method == "D-TRADES"]
    assert _fired(records + ablation) == set()    # Table 6.1's alpha = beta = 1 row is Table 6.3's D-TRADES
    ablation = _replace(ablation, "6.1", ALPHA_1, "na", None, "99.03")
    assert ("same model differs", ("6.3", "6.1"), (("mnist", "dtrades", "resnet18"),)) in _fired(records + ablation)


def test_a_stored_result_off_the_printed_one_fires():
    records = synthetic()
    stored = [Published("repository", None, "resnet18", "mnist", "TRADES", "na", None, "99.1", "file.csv"),
              Published("repository", None, "resnet18", "mnist", "TRADES", "ra", "fgsm", "95.4", "file.csv"),
              Published("repository", None, "resnet18", "mnist", "TRADES", "na", "autoattack", "12.0", "file.csv")]
    flags = rc.report_flags(records, stored)
    assert [(f.rule, f.cells) for f in flags] == [("printed against stored", (("mnist", "trades", "resnet18"),))]
    assert "printed 95.20, stored 95.4 (file.csv)" in flags[0].detail   # NA on AutoAttack's points: not printed


def test_claims_fire_where_the_table_contradicts_them():
    records = synthetic()
    true_claims = [
        rc.Extreme("D-TRADES", "na", ("6.3", "6.4")),
        rc.Extreme("TRADES", "ra", ("6.3",), attacks=("pgd20",)),
        rc.Better(("TRADES",), ("D-TRADES",), ("ra",), ("6.3", "6.4")),
        rc.Better(("TRADES",), ("D-TRADES",), ("rd",), ("6.5", "6.6")),   # lower RD is better
        rc.Equals("6.3", "mnist", "D-TRADES", "na", None, "99.3"),
        rc.Gap(("6.3",), "mnist", "ra", "TRADES", "D-TRADES", "2", "3", attacks=("pgd20", "autoattack")),
        rc.Share(("6.3", "6.4"), "ra", "90", most=True, attacks=("fgsm",)),
    ]
    false_claims = {
        "highest": rc.Extreme("TRADES", "na", ("6.3",)),
        "better": rc.Better(("D-TRADES",), ("TRADES",), ("ra",), ("6.4",), attacks=("pgd20",)),
        "equals": rc.Equals("6.3", "mnist", "D-TRADES", "na", None, "99.45"),
        "gap": rc.Gap(("6.3",), "mnist", "ra", "TRADES", "D-TRADES", "3", "4", attacks=("pgd20",)),
        "all above": rc.Share(("6.3", "6.4"), "ra", "90", attacks=("pgd20",)),
    }
    claims = [rc.Claim("true", "holds", c) for c in true_claims] + \
        [rc.Claim(name, "fails", c) for name, c in false_claims.items()]
    flags = rc.claim_flags(claims, records)
    assert [f.subject for f in flags] == list(false_claims)
    details = [f.detail.split("; but ", 1)[1] for f in flags]
    assert details[0] == "Table 6.3 MNIST NA: D-TRADES 99.30 > TRADES 99.10"
    assert details[1] == "Table 6.4 MNIST RA PGD-20: D-TRADES 86.20, TRADES 89.10"
    assert details[2] == "the text gives 99.45, Table 6.3 MNIST NA prints 99.30 for D-TRADES"
    assert details[3] == "Table 6.3 MNIST RA PGD-20: TRADES - D-TRADES = 90.30 - 87.60 = +2.70, not 3 to 4"
    assert details[4] == ("Table 6.3 MNIST RA PGD-20: 1 of 2 above 90 (not above: D-TRADES 87.60); "
                          "Table 6.4 MNIST RA PGD-20: 0 of 2 above 90 (not above: TRADES 89.10, D-TRADES 86.20)")


def test_a_tie_contradicts_better_but_not_highest():
    records = _replace(synthetic(), "6.3", "D-TRADES", "na", None, "99.10")   # TRADES's NA
    better = rc.Claim("better", "strictly higher", rc.Better(("D-TRADES",), ("TRADES",), ("na",), ("6.3",)))
    highest = rc.Claim("highest", "the highest", rc.Extreme("D-TRADES", "na", ("6.3",)))
    flags = rc.claim_flags([better, highest], records)
    assert [f.subject for f in flags] == ["better"] and flags[0].detail.endswith("D-TRADES 99.10, TRADES 99.10")


@pytest.mark.parametrize("claim, message", [
    (rc.Extreme("DTRADES", "na", ("6.3",)), "prints no MNIST NA for 'DTRADES'"),
    (rc.Extreme("TRADES", "ra", ("6.3",), attacks=("pgd",)), "has no attack pgd"),
    (rc.Better(("TRADES",), ("D-TRADES",), ("ra",), ("6.3",), datasets=("cifar10",)), "has no dataset cifar10"),
    (rc.Equals("6.2", "mnist", "TRADES", "na", None, "99"), "Table 6.2 prints no"),
])
def test_a_claim_naming_what_the_tables_lack_fails_early(claim, message):
    with pytest.raises(ValueError, match=message):
        rc.claim_flags([rc.Claim("where", "says", claim)], synthetic())


def test_every_claim_of_the_report_names_what_its_tables_hold():
    tables = rc.PrintedTables(PRINTED)
    for claim in CLAIMS:
        claim.check.contradictions(tables)   # raises on a name the tables lack
        assert claim.where.startswith("Section") and claim.says.startswith("that ")
    assert ALPHA_HALF in tables.methods("6.1")
