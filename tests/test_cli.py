"""The command line: flags, their help, and bad input.

Fuzzing (hypothesis): any mix of run flags, method options (``--<method>-<option>``, drawn from
fastrobust.methods.METHODS and the option metadata), evaluation flags, values, unknown names, negative
numbers and empty strings gives either a valid configuration or a clean error - ``fastrobust: error:
...`` on one line with status 2, or argparse's usage message with SystemExit(2) - never a traceback.
Nothing is trained: ``train --dry-run`` stops after validation."""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
import typing
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import loaders
import recipes
from fastrobust.cli import build_parser
from fastrobust.cli import main as cli_main
from conftest import parse_train_config, train_config
from fastrobust.attacks import PGD
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.errors import ConfigError
from fastrobust.methods import METHODS
from fastrobust.options import base_type, choices_of

# hypothesis caches (example database, constants) go to the temp folder, not into the checkout
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "fastrobust-hypothesis"))
FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class Flag:
    dest: str                     # the argparse destination, e.g. "dtrades_sync", "eval_pgd_steps"
    tp: object                    # the field's annotation
    choices: tuple[str, ...] | None
    meta: tuple = ()              # the option's metadata (low/high bounds), as items
    method: str | None = None     # for a method option: its method

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _fields(cls, prefix="", skip=(), method=None) -> list[Flag]:
    hints = typing.get_type_hints(cls)
    return [Flag(prefix + f.name, hints[f.name], tuple(choices_of(f)) if choices_of(f) is not None else None,
                 tuple(sorted(f.metadata.items(), key=lambda kv: kv[0])), method)
            for f in dataclasses.fields(cls) if f.name not in skip]


RUN_FLAGS = _fields(TrainConfig, skip=("eval", "method")) + _fields(EvalConfig, "eval_", skip=("dataset",))
METHOD_FLAGS = [f for name, cls in sorted(METHODS.items()) for f in _fields(cls, f"{name}_", method=name)]
METHOD_FLAG = Flag("method", str, tuple(sorted(METHODS)))
DEVICES = ("auto", "cpu", "cuda", "cuda:1")

numbers = st.one_of(st.integers(-5, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["0", "-0", "1e-3", "0.5", "-1", "1e400", "nan", "inf", "-inf", "2**63", "8/255",
                                     "1/0", "3/"]))
junk = st.one_of(st.just(""), st.just("none"), st.just(" "), st.text(max_size=8), numbers)


def _typo(name: str) -> st.SearchStrategy[str]:
    return st.integers(0, max(len(name) - 1, 0)).map(lambda i: name[:i] + name[i + 1:] if name else "x")


def _mostly(valid: st.SearchStrategy, *others: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` seven times in ten, else one of ``others`` (st.one_of would not weight the branches)."""
    return st.integers(0, 9).flatmap(lambda i: valid if i < 7 else others[i % len(others)])


def _in_range(flag: Flag, base) -> st.SearchStrategy[str]:
    """Numbers inside the option's declared bounds (capped, so the values stay cheap to validate)."""
    m = dict(flag.meta)
    lo = m.get("low") if m.get("low") is not None else -5
    hi = m.get("high") if m.get("high") is not None else lo + (300 if base is int else 10)
    hi = min(hi, lo + (300 if base is int else 10))
    if base is int:
        return st.integers(int(lo) + bool(m.get("low_open")), int(hi) - bool(m.get("high_open"))).map(str)
    floats = st.floats(lo, hi, exclude_min=bool(m.get("low_open")), exclude_max=bool(m.get("high_open")))
    return st.one_of(floats.map(repr), floats.map(lambda v: f"{v * 255:.6g}/255"))   # fractions too


def _values(flag: Flag) -> st.SearchStrategy[str]:
    """Strings for one flag: mostly valid values, else near misses and junk."""
    base = base_type(flag.tp)[0]
    names = flag.choices or (DEVICES if flag.dest == "device" else None)
    if names:
        valid = st.sampled_from(names)
        one = _mostly(valid, valid.flatmap(_typo), junk)
        if typing.get_origin(base) is tuple:
            return st.lists(one, max_size=3).map(",".join)
        return one
    if typing.get_origin(base) is tuple:
        elem = base_type(typing.get_args(base)[0])[0]
        return st.lists(st.one_of(_in_range(flag, elem), numbers), max_size=3).map(",".join) | junk
    if base in (int, float):
        valid = _in_range(flag, base)
        return _mostly(valid, st.integers(-3, 300).map(str), junk)
    return junk | st.text(alphabet="abc/_.-", max_size=12)


def _is_bool(flag: Flag) -> bool:
    return base_type(flag.tp)[0] is bool


@st.composite
def argvs(draw) -> list[str]:
    argv: list[str] = []
    method = draw(st.sampled_from([None, *sorted(METHODS)]))
    if method is not None:
        argv += ["--method", draw(st.one_of(st.just(method), st.just(method), _values(METHOD_FLAG)))]
    # mostly options of the chosen method (the default one is trades), sometimes any method's
    own = [f for f in METHOD_FLAGS if f.method == (method or "trades")]
    pool = RUN_FLAGS + METHOD_FLAGS + own * 4
    for flag in draw(st.lists(st.sampled_from(pool), max_size=5)):
        if _is_bool(flag):
            argv.append(draw(st.sampled_from([flag.flag, "--no-" + flag.flag[2:]])))
        else:
            argv += [flag.flag, draw(_values(flag))]
    if draw(st.integers(0, 5)) == 0:  # an unknown flag or a stray word somewhere
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--epoch", "--lr-shedule", "extra", "--",
                                                                          "--lambda-sync", "--beta"])))
    return argv


def _run(argv: list[str]) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(["train", "--dry-run", *argv])
        except SystemExit as e:
            code = ("argparse", e.code)
    return code, out.getvalue(), err.getvalue()


def _last_values(argv: list[str]) -> dict[str, str]:
    """flag -> its last value in ``argv`` (argparse keeps the last), for flags that take one."""
    takes_value = {f.flag for f in RUN_FLAGS + METHOD_FLAGS + [METHOD_FLAG] if not _is_bool(f)}
    return {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a in takes_value}


def _check_argv(argv: list[str]) -> str:
    """One command line: a valid config or a clean error. Returns the outcome's kind."""
    code, out, err = _run(argv)
    assert "Traceback" not in err
    if code == ("argparse", 2):
        assert err.startswith("usage: fastrobust") and "error:" in err, err
        return "usage"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastrobust: error: ") and not out, err
        return "other method's option" if "is an option of method" in err else "error"
    assert code == 0, (code, err)
    cfg = TrainConfig.from_dict(json.loads(out)).validate()
    assert cfg == parse_train_config(argv)  # the printed config is the parsed one
    assert cfg.batch_size >= 1 and cfg.attack.steps >= 1 and cfg.attack.eps >= 0 and math.isfinite(cfg.lr)
    # every method option given belongs to the method, and a named option reached it as given
    used = [f for f in METHOD_FLAGS if f.flag in set(argv)]
    assert all(f.method == cfg.method.name for f in used), ([f.flag for f in used], cfg.method.name)
    by_flag = {f.flag: f for f in METHOD_FLAGS}
    for flag, value in _last_values(argv).items():
        if flag == "--method":
            assert cfg.method.name == value
        elif flag in by_flag and by_flag[flag].choices:
            f = by_flag[flag]
            assert getattr(cfg.method, f.dest[len(f.method) + 1:]) == value, (flag, cfg.method)
    return "valid with a method option" if used else "valid"


def test_cli_gives_a_config_or_a_clean_error():
    outcomes = Counter()

    @FUZZ
    @given(argvs())
    def run(argv):
        outcomes[_check_argv(argv)] += 1

    run()
    print(f"\noutcomes: {dict(outcomes)}")
    # the fuzz reaches every outcome, method options included (derandomized: the same examples each run)
    assert set(outcomes) == {"usage", "error", "other method's option", "valid", "valid with a method option"}, outcomes


def test_valid_flags_parse_to_their_values():
    cfg = parse_train_config(["--method", "dtrades", "--dtrades-sync", "global", "--dropout", "0", "--sync-bn",
                              "--batch-size", "512", "--eval-attacks", "pgd", "--lr-milestones", "1,2", "--ema-decay", "none"])
    assert (cfg.method.name, cfg.method.sync, cfg.dropout, cfg.sync_bn, cfg.batch_size) == ("dtrades", "global", 0.0, True, 512)
    assert cfg.eval.attacks == ("pgd",) and cfg.lr_milestones == (1.0, 2.0) and cfg.ema_decay is None
    cfg = parse_train_config(["--method", "faal", "--faal-r", "0.5", "--faal-base", "at", "--eps", "8/255"])
    assert (cfg.method.name, cfg.method.r, cfg.method.base, cfg.attack.eps) == ("faal", 0.5, "at", 8 / 255)
    # a method's flags are its options' names: D-TRADES' normalize and lambda_scale, as kernels.dtrades_loss names them
    cfg = parse_train_config(["--method", "dtrades", "--dtrades-normalize", "mean", "--dtrades-lambda-scale", "3"])
    assert (cfg.method.normalize, cfg.method.lambda_scale) == ("mean", 3.0)
    # the default method is TRADES: its options need no --method
    assert parse_train_config(["--trades-beta", "4"]).method.beta == 4.0


@pytest.mark.parametrize("method,flag,value", [(m, f.flag, str(f.choices[0]) if f.choices else "1")
                                               for m in sorted(METHODS) for f in METHOD_FLAGS if f.method != m][:40])
def test_an_option_of_another_method_is_one_line(method, flag, value, capsys):
    code = cli_main(["train", "--dry-run", "--method", method, flag, value])
    err = capsys.readouterr().err
    owner = next(f.method for f in METHOD_FLAGS if f.flag == flag)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip() == (f"fastrobust: error: {flag} is an option of method {owner}, but the method is {method}: "
                           f"drop it or pass --method {owner}.")


def test_every_method_option_has_a_flag():
    parser_flags = {opt for a in _subparsers(build_parser())["train"]._actions for opt in a.option_strings}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            assert f"--{name}-{f.name.replace('_', '-')}" in parser_flags, (name, f.name)


plain = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(), st.text(max_size=6),
                  st.lists(st.integers(-2, 5), max_size=3))
keys = st.one_of(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), st.text(max_size=6))
# a method in a config dict: a name, or {"name": ..., **options} with real and bogus option names
method_values = st.one_of(st.sampled_from(sorted(METHODS)), st.sampled_from(sorted(METHODS)).flatmap(
    lambda m: st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(METHODS[m])] + ["bogus"]), plain,
                              max_size=3).map(lambda d: {"name": m, **d})))


@FUZZ
@given(st.dictionaries(keys, st.one_of(plain, st.dictionaries(st.sampled_from(
    [f.name for f in dataclasses.fields(EvalConfig)] + ["bogus"]), plain, max_size=3)), max_size=5),
       st.one_of(st.none(), method_values))
def test_config_dicts_give_a_config_or_a_config_error(d, method):
    """from_dict + validate (manifests, recipe --set overrides): a ConfigError or a valid config."""
    if method is not None:
        d = {**d, "method": method}
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
    assert cfg.dataset in loaders.DATASETS and cfg.batch_size >= 1


# ---------------------------------------------------------------------------------------- --help
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> parser of every sub-command (``bench step`` as "bench step")."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{parser.prog.split(' ', 1)[1]} {name}" if " " in parser.prog else name
                out[full] = sub
                out.update(_subparsers(sub))
    return out


def _recipe_parser(monkeypatch) -> argparse.ArgumentParser:
    """The parser a recipe module builds (captured where it parses; nothing runs)."""
    captured = []

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        recipes.main("cifar10", "dtrades", "resnet18", [])
    return captured[0]


HELP_COMMANDS = ["train", "eval", "bench step", "bench kernels", "bench loaders", "check-gpu", "data write"]


def test_every_flag_has_a_help_line(monkeypatch):
    subs = _subparsers(build_parser())
    assert set(HELP_COMMANDS) <= set(subs), sorted(subs)
    parsers = {**subs, "recipe": _recipe_parser(monkeypatch)}   # every sub-command, the listed ones included
    monkeypatch.undo()
    for name, parser in parsers.items():
        text = parser.format_help()   # renders every help string (a stray % would raise here)
        assert text.startswith("usage:"), name
        for action in parser._actions:
            if action.option_strings:
                assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                    (name, action.option_strings)
                assert action.option_strings[-1] in text, (name, action.option_strings)


def _shown(value) -> str:
    """How a default reads in --help."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(empty)"
    return str(value)


def test_train_flags_show_their_default():
    """Every train flag that sets a field shows the field's default, generated from the field metadata."""
    train = _subparsers(build_parser())["train"]
    helps = {a.dest: a.help for a in train._actions}
    expected = {}
    for cls, prefix, skip in [(TrainConfig, "", ("eval", "method", "attack")), (EvalConfig, "eval_", ("dataset",)),
                              (PGD, "attack_", ()), *[(cls, f"{name}_", ()) for name, cls in METHODS.items()]]:
        for f in dataclasses.fields(cls):
            if f.name not in skip:   # the training attack's defaults: TrainConfig's attack
                default = getattr(TrainConfig().attack, f.name) if cls is PGD else f.default
                expected[prefix + f.name] = f"default: {_shown(default)}"
    assert set(expected) <= set(helps)
    for dest, shown in expected.items():
        assert helps[dest].replace("%%", "%").endswith(shown), (dest, helps[dest], shown)
    assert helps["method"].endswith(f"default: {TrainConfig().method.name}")
    rendered = " ".join(train.format_help().split())   # argparse wraps lines
    assert "default: 0.0002" in rendered and "default: 90.0,100.0" in rendered and "default: minmax" in rendered


# ------------------------------------------------------- bad input: exit status 2, one line, no traceback
def _one_error_line(capsys, argv) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fastrobust: error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


BASE = ["train", "--dataset", "mnist", "--model", "smallcnn", "--no-progress"]


@pytest.mark.parametrize("flags,expected", [
    (["--method", "dtrade"], "unknown method 'dtrade'. Did you mean 'dtrades'"),
    (["--model", "resnet19"], "unknown model 'resnet19'. Did you mean 'resnet18'"),
    (["--dataset", "cifar100"], "unknown dataset 'cifar100'. Did you mean 'cifar10'?"),
    (["--eval-attacks", "pgd,autoatack"], "unknown attack 'autoatack'. Did you mean 'autoattack'?"),
    (["--eval-aa-attacks", "apgd-cd", "--eval-aa-version", "custom"], "Did you mean 'apgd-ce'"),
    (["--method", "dtrades", "--dtrades-sync", "globl"], "unknown lambda sync mode 'globl'. Did you mean 'global'"),
    (["--method", "dtrades", "--dtrades-normalize", "minmx"], "unknown lambda normalisation 'minmx'. Did you mean 'minmax'"),
    (["--method", "faal", "--faal-base", "trade"], "Did you mean 'trades'"),
    (["--trades-beta", "-1"], "trades beta must be a finite number >= 0, got -1.0"),
    (["--method", "mart", "--trades-beta", "4"], "--trades-beta is an option of method trades, but the method is mart"),
    (["--eps", "-0.1"], "eps must be a finite number >= 0, got -0.1"),
    (["--eval-eps", "nan"], "eval eps must be a finite number >= 0, got nan"),
    (["--attack-steps", "0"], "attack steps must be an integer >= 1, got 0"),
    (["--eval-pgd-steps", "-3"], "pgd_steps must be an integer >= 1, got -3"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--eval-batch-size", "0"], "eval batch_size must be an integer >= 1, got 0"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**63)"),
    (["--dropout", "1"], "dropout must lie in [0, 1)"),
    (["--device", "gpu0"], "invalid device 'gpu0'"),
    (["--out-dir", ""], "out_dir must not be an empty string"),
])
def test_bad_values_are_one_clear_line(capsys, flags, expected):
    assert expected in _one_error_line(capsys, BASE + flags)


def test_bad_eval_options_fail_before_loading_anything(capsys, tmp_path):
    line = _one_error_line(capsys, ["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--attacks", "fgsm,pgdd"])
    assert "unknown attack 'pgdd'. Did you mean 'pgd'?" in line
    line = _one_error_line(capsys, ["eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert "missing.pt cannot be loaded (FileNotFoundError: [Errno 2] No such file or directory" in line


def test_malformed_flags_are_argparse_usage_errors(capsys):
    for argv in (BASE + ["--epochs", "two"], BASE + ["--no-such-flag"], BASE + ["--eps"], BASE + ["--eps", "8/0"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: fastrobust") and "error:" in err and "Traceback" not in err
    assert "argument --attack-eps/--eps: --attack-eps expects a number, got '8/0'" in err   # a fraction that is no number


def test_wrong_data_layout(capsys, tmp_path):
    (tmp_path / "data" / "MNIST").mkdir(parents=True)   # torchvision's folder, but no raw/ files
    line = _one_error_line(capsys, BASE + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])
    assert "no mnist 'train' data found under" in line and "MNIST/raw/train-images-idx3-ubyte" in line
    assert "--data-dir" in line  # the fix


def test_unwritable_output_folder(capsys, tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _one_error_line(capsys, BASE + ["--data-dir", str(data_dir), "--out-dir", str(blocker / "run")])
    assert f"--out-dir) {blocker / 'run'} cannot be created or written to ({blocker} is a file, not a folder)" in line
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot be created or written to (Permission denied)" in _one_error_line(
            capsys, BASE + ["--data-dir", str(data_dir), "--out-dir", str(locked / "run")])


