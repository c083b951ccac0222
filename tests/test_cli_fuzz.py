"""Fuzzing the command line and the config parsing (hypothesis): any mix of flags, values, unknown
names, negative numbers and empty strings gives either a valid configuration or a clean error -
``fastrobust: error: ...`` on one line with status 2, or argparse's usage message with SystemExit(2) -
never a traceback. Nothing is trained: ``train --dry-run`` stops after validation."""
import contextlib
import dataclasses
import io
import json
import math
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import recipes
from fastrobust import config as C
from fastrobust.cli import main as cli_main
from fastrobust.cli import parse_train_config
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.errors import ConfigError
from fastrobust.models import list_models

# hypothesis caches (example database, constants) go to the temp folder, not into the checkout
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "fastrobust-hypothesis"))
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

CHOICES = {"dataset": C.DATASETS, "method": C.METHODS, "model": tuple(list_models()), "lr_schedule": C.LR_SCHEDULES,
           "lambda_norm": C.LAMBDA_NORMS, "lambda_sync": C.LAMBDA_SYNCS, "sensitivity": C.SENSITIVITIES,
           "faal_base": C.FAAL_BASES, "amp": C.AMP_MODES, "kernels": C.KERNEL_BACKENDS, "norm": ("linf", "l2"),
           "compile_mode": C.COMPILE_MODES, "loader": C.LOADERS, "device": ("auto", "cpu", "cuda", "cuda:1"),
           "eval_attacks": C.EVAL_ATTACKS, "eval_norm": ("linf", "l2"), "eval_pgd_random_start": C.RANDOM_STARTS,
           "eval_aa_version": C.AA_VERSIONS, "eval_aa_attacks": C.AA_ATTACKS}

numbers = st.one_of(st.integers(-5, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["0", "-0", "1e-3", "0.5", "-1", "1e400", "nan", "inf", "-inf", "2**63"]))
junk = st.one_of(st.just(""), st.just("none"), st.just(" "), st.text(max_size=8), numbers)


def _typo(name: str) -> st.SearchStrategy[str]:
    return st.integers(0, max(len(name) - 1, 0)).map(lambda i: name[:i] + name[i + 1:] if name else "x")


def _values(name: str, tp) -> st.SearchStrategy[str]:
    """Strings for one flag: valid values, near misses and junk."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) and len(args) == 1 else tp
    if name in CHOICES:
        names = CHOICES[name]
        one = st.one_of(st.sampled_from(names), st.sampled_from(names).flatmap(_typo), junk)
        if typing.get_origin(base) is tuple:
            return st.lists(one, max_size=3).map(",".join)
        return one
    if typing.get_origin(base) is tuple:
        return st.lists(numbers, max_size=3).map(",".join) | junk
    if base is int:
        return st.one_of(st.integers(-3, 300).map(str), st.integers(-3, 300).map(str), junk)
    if base is float:
        return st.one_of(st.floats(-1, 10).map(repr), st.floats(0, 1).map(repr), junk)
    return junk | st.text(alphabet="abc/_.-", max_size=12)


def _flag_table() -> list[tuple[str, object]]:
    table = []
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name != "eval":
            table.append((f.name, hints[f.name]))
    ehints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        if f.name != "dataset":
            table.append(("eval_" + f.name, ehints[f.name]))
    return table


FLAGS = _flag_table()


@st.composite
def argvs(draw) -> list[str]:
    argv: list[str] = []
    for name, tp in draw(st.lists(st.sampled_from(FLAGS), max_size=5)):
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            argv.append(draw(st.sampled_from([flag, "--no-" + flag[2:]])))
        else:
            argv += [flag, draw(_values(name, tp))]
    if draw(st.integers(0, 3)) == 0:  # an unknown flag or a stray word somewhere
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--epoch", "--lr-shedule", "extra", "--"])))
    return argv


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(["train", "--dry-run", *argv])
        except SystemExit as e:
            code = ("argparse", e.code)
    return code, out.getvalue(), err.getvalue()


@FUZZ
@given(argvs())
def test_cli_gives_a_config_or_a_clean_error(argv):
    code, out, err = _run(argv)
    assert "Traceback" not in err
    if code == ("argparse", 2):
        assert err.startswith("usage: fastrobust") and "error:" in err, err
    elif code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastrobust: error: ") and not out, err
    else:
        assert code == 0, (code, err)
        cfg = TrainConfig.from_dict(json.loads(out)).validate()
        assert cfg == parse_train_config(argv)  # the printed config is the parsed one
        assert cfg.batch_size >= 1 and cfg.attack_steps >= 1 and cfg.eps >= 0 and math.isfinite(cfg.lr)


def test_valid_flags_parse_to_their_values():
    cfg = parse_train_config(["--method", "dtrades", "--lambda-sync", "global", "--dropout", "0", "--sync-bn",
                              "--batch-size", "512", "--eval-attacks", "pgd", "--lr-milestones", "1,2", "--ema-decay", "none"])
    assert (cfg.method, cfg.lambda_sync, cfg.dropout, cfg.sync_bn, cfg.batch_size) == ("dtrades", "global", 0.0, True, 512)
    assert cfg.eval.attacks == ("pgd",) and cfg.lr_milestones == (1.0, 2.0) and cfg.ema_decay is None


plain = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(), st.text(max_size=6),
                  st.lists(st.integers(-2, 5), max_size=3))
keys = st.one_of(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), st.text(max_size=6))


@FUZZ
@given(st.dictionaries(keys, st.one_of(plain, st.dictionaries(st.sampled_from(
    [f.name for f in dataclasses.fields(EvalConfig)] + ["bogus"]), plain, max_size=3)), max_size=5))
def test_config_dicts_give_a_config_or_a_config_error(d):
    """from_dict + validate (manifests, recipe --set overrides): a ConfigError or a valid config."""
    try:
        cfg = TrainConfig.from_dict(d).validate()
    except ConfigError as e:
        assert str(e)
        return
    assert TrainConfig.from_dict(json.loads(cfg.to_json())).validate() == cfg


@FUZZ
@given(st.dictionaries(keys, plain, max_size=4))
def test_recipe_overrides_give_a_config_or_a_config_error(overrides):
    try:
        cfg = recipes.make_config("mnist", "dtrades", "smallcnn", "smoke", overrides=overrides)
    except ConfigError:
        return
    assert cfg.dataset in C.DATASETS and cfg.batch_size >= 1


@pytest.mark.parametrize("argv", [["--set", "epochs"], ["--set", "epochz=2"], ["--set", "batch_size=-1"],
                                  ["--set", "eval={'attacks': ('pgdd',)}"]])
def test_recipe_command_line_errors_are_clean(argv, capsys):
    code = recipes.main("mnist", "dtrades", "smallcnn", ["--profile", "smoke", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("python -m recipes.mnist_dtrades_smallcnn: error: ") and len(err.strip().splitlines()) == 1, err
