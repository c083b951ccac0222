"""recipes.protocols NOTES: every choice the report leaves unstated (or where its code differs from its text) is
labelled with its source; a note on a config field states the value the paper profile really runs; the
recipe listing marks the cells outside the report's tables; each run's manifest records its cell's notes;
README renders the table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import recipes
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.methods import METHODS
from recipes.protocols import NOTE_SOURCES, NOTES, PAPER_NOTES, PROFILES, Note, cell_in_report, notes_markdown, \
    protocol_notes
from recipes.published import report_cells
from conftest import train_config

REPO = Path(__file__).resolve().parents[1]


def _field(cfg, setting):
    obj, name = cfg, setting
    for part in setting.split(".")[:-1]:
        obj = getattr(obj, part)
        name = setting.rsplit(".", 1)[1]
    return getattr(obj, name)


def test_every_field_note_states_what_the_paper_profile_runs():
    checked = 0
    for d, row, arch in PROFILES["paper"].cells:
        cfg = recipes.make_config(d, row, arch, "paper")
        for note in PAPER_NOTES:
            if note.field and note.covers(d, cfg.method.name):
                assert _field(cfg, note.setting) == note.value, (note.setting, (d, row, arch))
                checked += 1
    assert checked > len(PROFILES["paper"].cells)


def test_every_note_covers_a_cell_and_names_its_source():
    cells = PROFILES["paper"].cells
    for note in PAPER_NOTES:
        assert note.source in NOTE_SOURCES and note.why
        assert any(note.covers(d, PROFILES["paper"].rows[r].name) for d, r, _ in cells), note.setting
        assert all(m in METHODS for m in note.methods)
    with pytest.raises(ValueError, match="source"):
        Note("lr", 0.1, "the literature", "why")
    # a choice where the report's text and code disagree follows the text, and says what the code does
    followed_text = [n for n in PAPER_NOTES if n.source == "report"]
    assert followed_text and all(n.code for n in followed_text)
    assert {n.setting for n in followed_text} >= {"lr_milestones", "weight_decay"}


def test_the_cells_outside_the_reports_tables_are_additions():
    assert cell_in_report("cifar10", "dtrades", "resnet18") and cell_in_report("mnist", "dtrades_half", "vgg16")
    for cell in (("cifar10", "at", "vgg16"), ("mnist", "dtrades_mean6", "resnet18"), ("mnist", "trades", "smallcnn")):
        assert not cell_in_report(*cell)
        assert protocol_notes("paper", *cell)["cell"].startswith("this project's addition")
    out = subprocess.run([sys.executable, "-m", "recipes", "--profile", "paper"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    listed = [line for line in out.splitlines() if line.startswith("python -m recipes.")]
    assert len(listed) == len(PROFILES["paper"].cells)
    for line in listed:
        cell = recipes.all_cells()[line.split()[2].removeprefix("recipes.")]
        assert ("[addition: not in the report's tables]" in line) == (cell not in report_cells())
    assert notes_markdown("paper") in out


def test_readme_renders_the_paper_profiles_notes():
    assert notes_markdown("paper") in (REPO / "README.md").read_text(), \
        "README's Recipes section should hold `python -m recipes --profile paper`'s notes table"


def test_a_recipe_run_hands_its_cells_notes_to_the_manifest(monkeypatch, tmp_path):
    import fastrobust.train

    class Captured(Exception):
        pass

    def fake_train(cfg, manifest_extra=None):
        raise Captured(manifest_extra)

    monkeypatch.setattr(fastrobust.train, "train", fake_train)
    with pytest.raises(Captured) as got:
        recipes.run_cells([("mnist", "dtrades", "vgg16")], "paper", tmp_path, {})
    notes = got.value.args[0]["protocol_notes"]
    assert notes == json.loads(json.dumps(protocol_notes("paper", "mnist", "dtrades", "vgg16")))
    settings = {n["setting"] for n in notes["notes"]}
    assert {"D-TRADES lambda", "input_normalization", "eval.aa_samples", "val_samples"} <= settings
    assert "lr_milestones" not in settings                      # a CIFAR-10 note
    assert notes["cell_in_report"] and NOTES.get("cpu") is None


def test_the_trainer_writes_extra_manifest_entries(tmp_path, data_dir):
    from fastrobust.train import Trainer

    cfg = train_config(dataset="mnist", model="smallcnn", method=METHODS["standard"](), epochs=1, train_limit=128,
                      batch_size=64, val_samples=64, out_dir=str(tmp_path / "run"), progress=False,
                      data_dir=str(data_dir), eval=EvalConfig(dataset="mnist", eps=0.3))
    extra = {"protocol_notes": protocol_notes("paper", "mnist", "standard", "resnet18")}
    Trainer(cfg, extra).write_manifest()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["protocol_notes"] == json.loads(json.dumps(extra["protocol_notes"]))
    assert "config" in manifest
