"""RobustBench: its zoo models through ``fastrobust eval --robustbench NAME``, and any evaluation written as a
RobustBench ``model_info`` entry (``--export-robustbench FILE.json``).

robustbench is an optional dependency (``pip install 'fastrobust[robustbench]'``) imported by :func:`load` only;
the export needs nothing from it. Nothing here downloads: the weights are read, with the safe loader of every
checkpoint, from the file RobustBench's own ``load_model`` reads (and would download); a missing file is an
error that says where it belongs and how to get it. Zoo models take images in [0, 1] and hold their own input
normalisation, fastrobust's convention too: they are evaluated as they are (eval mode, fp32) by ``evaluate``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ck
from .errors import CheckpointError, ConfigError, unknown_name
from .report import check_output_file, write_json

INSTALL = "pip install 'fastrobust[robustbench]'"
DEFAULT_DIR = "models"   # robustbench.utils.load_model's default model_dir (./models)
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}   # --norm -> RobustBench's ThreatModel
# What RobustBench's loader lets a file lack (robustbench.utils._safe_load_state_dict): normalisation
# constants that the architecture registers itself (Wong2020Fast's mu and sigma, say).
OPTIONAL_KEYS = ("mu", "sigma", "mean", "std", "normalize.mean", "normalize.std")
LAST_ENTRY = ("Kireev2021Effectiveness", "Andriushchenko2020Understanding")   # files of 'last' and 'best' weights


@dataclasses.dataclass
class ZooModel:
    name: str
    dataset: str
    threat_model: str
    path: Path
    module: torch.nn.Module

    @property
    def label(self) -> str:
        return f"{self.name} (RobustBench {self.dataset} {self.threat_model})"

    def manifest(self, digest: str | None) -> dict[str, Any]:
        return {"model": self.name, "dataset": self.dataset, "threat_model": self.threat_model,
                "weights": str(self.path), "weights_sha256": digest}


def default_out(name: str, dataset: str, threat_model: str) -> Path:
    return Path("runs") / "robustbench" / dataset / threat_model / name / "eval"


def registry() -> tuple[Any, Any, Any]:
    """robustbench's model registry and enums. Its 1.1.1 release imports AutoAttack under the module name of
    the authors' repository, ``autoattack``; PyPI ships that code as ``pyautoattack``, aliased here."""
    try:
        if "autoattack" not in sys.modules and importlib.util.find_spec("autoattack") is None:
            import pyautoattack
            import pyautoattack.state
            sys.modules.update({"autoattack": pyautoattack, "autoattack.state": pyautoattack.state})
        with warnings.catch_warnings():   # its imports warn about deprecations that are not the user's to fix
            warnings.simplefilter("ignore")
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
            from robustbench.model_zoo.models import model_dicts
    except ImportError as e:
        raise ConfigError(f"--robustbench needs the robustbench package, which cannot be imported ({e}): "
                          f"{INSTALL}") from e
    return model_dicts, BenchmarkDataset, ThreatModel


@contextlib.contextmanager
def offline():
    """No connection while an architecture is built: a few zoo constructors fetch pretrained weights
    (timm's pretrained=True). Refused at once, they fail here instead of downloading or hanging."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("fastrobust does not download: network access is refused while the model is built")
    saved = socket.socket.connect, socket.getaddrinfo
    socket.socket.connect, socket.getaddrinfo = refuse, refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.getaddrinfo = saved


def load(name: str, dataset: str, norm: str, model_dir: str | Path | None = None) -> ZooModel:
    """RobustBench's ``name`` for ``dataset`` and ``norm`` with the weights from
    ``<model_dir>/<dataset>/<threat model>/<name>.pt``: every failure is a one-line error."""
    model_dicts, BenchmarkDataset, ThreatModel = registry()
    import loaders
    threat = THREAT_MODELS.get(norm)
    usable = sorted({d.value for d in BenchmarkDataset} & set(loaders.DATASETS))
    if threat is None or dataset not in usable:
        raise ConfigError(f"RobustBench's zoo has no {dataset} {norm} models that fastrobust can evaluate: "
                          f"--robustbench takes --dataset {' or '.join(usable)}, --norm {' or '.join(THREAT_MODELS)}.")
    models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in models:
        zoo = model_dicts[BenchmarkDataset(dataset)]
        other = [k for k, v in THREAT_MODELS.items() if name in zoo[ThreatModel(v)]]
        if other:   # a known name, of another threat model
            raise ConfigError(f"RobustBench model {name} is a {dataset} {THREAT_MODELS[other[0]]} model: "
                              f"pass --norm {other[0]}.")
        raise unknown_name(f"RobustBench {dataset} {threat} model", name, models)
    gdrive_id = models[name].get("gdrive_id")
    import timm   # a robustbench dependency: its loader takes the models timm registers from timm's hub
    if isinstance(gdrive_id, (list, tuple)) or not gdrive_id or \
            timm.is_model(f"{name.lower().replace('-', '_')}_{dataset}_{threat.lower()}"):
        how = (f"an ensemble of {len(gdrive_id)} weight files" if isinstance(gdrive_id, (list, tuple)) else
               "weights from timm's hub or a library, not one .pt file")
        raise ConfigError(f"RobustBench model {name} is not supported by --robustbench: RobustBench loads it "
                          f"specially ({how}); fastrobust evaluates an architecture with one weight file.")
    path = Path(model_dir or DEFAULT_DIR) / dataset / threat / f"{name}.pt"
    if not path.is_file():
        raise CheckpointError(  # RobustBench's layout: <model_dir>/<dataset>/<threat model>/<name>.pt
            f"no weights for RobustBench model {name}: expected {path} (--robustbench-dir, default ./{DEFAULT_DIR}, "
            f"holds {dataset}/{threat}/{name}.pt), and fastrobust never downloads. Where the network is reachable, run "
            f"python -c \"from fastrobust import zoo; zoo.registry(); from robustbench.utils import load_model; "
            f"load_model('{name}', model_dir='{path.parents[2]}', dataset='{dataset}', threat_model='{threat}')\" "
            f"(or fetch https://drive.google.com/uc?id={gdrive_id}), and copy the file to {path}.")
    obj = ck.read(path)   # weights_only=True: a damaged or unsafe file gets the checkpoint errors
    if name.startswith(LAST_ENTRY) and isinstance(obj, dict) and "last" in obj:
        obj = obj["last"]   # RobustBench evaluates the final weights of these files
    state = ck.state_dict_in(obj)
    if state is None:
        raise CheckpointError(f"{path} holds no state dict of tensors (found {type(obj).__name__}); it is not a "
                              f"RobustBench weight file: download it again.")
    # what RobustBench's loader strips: DataParallel's 'module.' prefix, then a wrapper's 'model.'
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    try:
        with offline():
            module = models[name]["model"]()
    except Exception as e:  # noqa: BLE001 - any constructor failure means the same: it cannot be built here
        raise ConfigError(f"RobustBench's architecture for {name} cannot be built offline "
                          f"({ck._first_line(e)}); --robustbench does not support it.") from e
    own = module.state_dict()   # the normalisation constants a file may lack come from the architecture
    state.update({k: own[k] for k in OPTIONAL_KEYS if k in own and k not in state})
    ck.load_weights(module, state, path)
    return ZooModel(name, dataset, threat, path, module.float().eval())


# ------------------------------------------------------------------------------------ export
def check_export(cfg: Any, path: str | Path) -> Path:
    """At argument time, before any attack: the evaluation measures AutoAttack, and ``path`` can be written."""
    if "autoattack" not in cfg.attacks or cfg.aa_samples < 1:
        raise ConfigError("--export-robustbench writes AutoAttack's robust accuracy, which this evaluation would not "
                          "measure: keep autoattack in --attacks and pass --aa-samples N > 0 (RobustBench evaluates "
                          "AutoAttack standard on its whole test set).")
    return check_output_file(path, "--export-robustbench")


def eps_text(eps: float) -> str:
    """A radius as RobustBench's files write it: "8/255" for a whole number of pixel levels, else "0.5"."""
    levels = eps * 255
    return f"{round(levels)}/255" if levels >= 0.5 and abs(levels - round(levels)) < 1e-6 else f"{eps:g}"


def percent(fraction: float) -> str:
    return str(round(100 * fraction, 2))   # robustbench.utils.update_json's format: "56.66", "0.0"


def entry(result: Any, architecture: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``result`` (an EvalResult with AutoAttack) in the fields of robustbench.utils.ModelInfo, plus a
    ``fastrobust`` key for what RobustBench's layout cannot hold. What fastrobust cannot know (the paper, its
    authors, venue and link, extra training data) is empty or null, as in RobustBench's own files."""
    cfg = result.config
    if "autoattack" not in result.ra:
        raise ConfigError("this evaluation holds no AutoAttack result; --export-robustbench needs one.")
    m = result.n_attacked["autoattack"]
    return {"link": "", "name": "", "authors": "", "additional_data": None, "number_forward_passes": None,
            "dataset": cfg["dataset"], "venue": "", "architecture": architecture, "eps": eps_text(cfg["eps"]),
            "clean_acc": percent(result.na), "reported": None, "autoattack_acc": percent(result.ra["autoattack"]),
            "footnote": f"Evaluated with fastrobust: clean accuracy on the first {result.n} test points, AutoAttack "
                        f"({cfg['aa_version']}) on the first {m}.",
            "fastrobust": {"threat_model": THREAT_MODELS[cfg["norm"]], "eps": cfg["eps"], "n": result.n,
                           "autoattack_n": m, "aa_version": cfg["aa_version"],
                           "clean_acc_on_autoattack_points": percent(result.na_on_attacked["autoattack"]),
                           "all_checks_passed": result.all_passed,
                           "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in result.checks],
                           **extra}}


def export(path: str | Path, result: Any, architecture: str, **extra: Any) -> Path:
    """Write :func:`entry` atomically to ``path`` (checked by :func:`check_export`); paths in ``extra``
    (results.json, points.npz) are written absolute, since the entry may be read from anywhere."""
    extra = {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in extra.items()}
    return write_json(path, entry(result, architecture, extra))
