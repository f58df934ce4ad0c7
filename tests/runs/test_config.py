"""Config loading: YAML, overrides, and errors that name the problem and the fix."""

from pathlib import Path

import pytest

from sail_fast.runs.config import load_config
from sail_fast.runs.yaml_files import dump_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "sd15.yaml", "sdxl.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.train.beta == 5000


def test_paper_settings_in_shipped_configs():
    sdxl = load_config(CONFIGS / "sdxl.yaml")
    assert sdxl.train.optimizer == "adafactor" and sdxl.train.pairs_per_step == 128
    assert (CONFIGS.parent / sdxl.train.deepspeed).is_file()
    assert load_config(CONFIGS / "sd15.yaml").train.optimizer == "adamw"


def test_overrides_are_typed(tmp_path):
    config = load_config(
        CONFIGS / "tiny.yaml",
        ["train.steps=7", "train.compile=true", "data.seed_pairs=[a, b]", "train.adam_betas=[0.8, 0.9]"],
    )
    assert config.train.steps == 7 and config.train.compile is True
    assert config.data.seed_pairs == ["a", "b"] and config.train.adam_betas == (0.8, 0.9)
    # YAML reads a bare `no` as False: it still means full precision.
    assert load_config(CONFIGS / "tiny.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "fp32"
    (tmp_path / "c.yaml").write_text(dump_yaml(config.model_dump(mode="json")))
    assert load_config(tmp_path / "c.yaml") == config


def test_unknown_key_names_it_and_suggests_the_right_one():
    with pytest.raises(
        ValueError, match=r"config key 'train.learning_rte' does not exist; did you mean 'train.learning_rate'"
    ):
        load_config(CONFIGS / "tiny.yaml", ["train.learning_rte=1"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ValueError, match="train.optimizer"):
        load_config(CONFIGS / "tiny.yaml", ["train.optimizer=sgd"])
    with pytest.raises(ValueError, match="exactly one of model.path"):
        load_config(CONFIGS / "tiny.yaml", ["model.path=somewhere"])
    with pytest.raises(ValueError, match="--set expects key=value"):
        load_config(CONFIGS / "tiny.yaml", ["train.steps"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="train.mixup_alpha = 1.5: Input should be less than or equal to 1"):
        load_config(CONFIGS / "tiny.yaml", ["train.mixup_alpha=1.5"])
    with pytest.raises(ValueError, match="sail.heldout_pairs names them already; set one of them"):
        load_config(CONFIGS / "tiny.yaml", ["sail.heldout_split=10", "sail.heldout_pairs=[pairs.jsonl]"])


def test_renamed_reference_keys_are_refused_in_one_line_naming_the_new_key(tmp_path):
    renamed = {
        "sail.reference": ("sail.ranking_reference", "previous"),
        "sail.round_reference": ("sail.training_reference", "base"),
    }
    for old, (new, value) in renamed.items():
        with pytest.raises(ValueError) as err:
            load_config(CONFIGS / "toy.yaml", [f"{old}={value}"])
        assert f"config key '{old}' was renamed '{new}'" in str(err.value) and "\n" not in str(err.value)
        assert getattr(load_config(CONFIGS / "toy.yaml", [f"{new}={value}"]).sail, new.split(".")[1]) == value
    old_file = tmp_path / "old.yaml"
    old_file.write_text(
        (CONFIGS / "toy.yaml").read_text().replace("  ranking_reference: base\n", "  reference: base\n")
    )
    with pytest.raises(ValueError, match=r"'sail.reference' was renamed 'sail.ranking_reference'"):
        load_config(old_file)
    # a round's overrides are read the same way
    with pytest.raises(ValueError, match=r"'sail.round_reference' was renamed 'sail.training_reference'"):
        load_config(CONFIGS / "toy.yaml", ["sail.round_overrides={1: [sail.round_reference=base]}"])


def test_a_run_recorded_before_the_rename_still_loads_and_resumes(tmp_path):
    # Its config.yaml holds the old keys: read under the new names, and --resume sees no change.
    from sail_fast.runs.run_folder import load_recorded_config, record_config

    current = load_config(
        CONFIGS / "toy.yaml",
        ["sail.ranking_reference=previous", "sail.round_overrides={2: [sail.training_reference=base]}"],
    )
    old = (
        dump_yaml(current.model_dump(mode="json"))
        .replace("ranking_reference:", "reference:")
        .replace("sail.training_reference=", "sail.round_reference=")
    )
    assert "  reference: previous" in old and "sail.round_reference=base" in old
    (tmp_path / "config.yaml").write_text(old)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "done.json").write_text("{}\n")  # a stage it finished: a run folder, recorded once resumed
    loaded = load_recorded_config(tmp_path, code="refuse")
    assert loaded == current and loaded.sail.round_overrides == {2: ["sail.training_reference=base"]}
    record_config(tmp_path, current.model_dump(mode="json"), resume=True)  # no ConfigChangedError
    assert (tmp_path / "config.yaml").read_text() == old and not list(tmp_path.glob("config.resume-*"))
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_recorded_config(tmp_path / "elsewhere", code="refuse")


def test_a_run_recorded_when_select_loss_was_called_auto_still_loads(tmp_path):
    from sail_fast.runs.run_folder import load_recorded_config

    current = load_config(CONFIGS / "toy.yaml", ["sail.select=loss", "sail.round_overrides={2: [sail.select=loss]}"])
    old = dump_yaml(current.model_dump(mode="json")).replace("select: loss", "select: auto")
    (tmp_path / "config.yaml").write_text(old.replace("sail.select=loss", "sail.select=auto"))
    assert "select: auto" in old and load_recorded_config(tmp_path, code="refuse") == current
    # Written by hand today, the old value is refused with the new one named.
    with pytest.raises(ValueError, match=r"sail.select: 'auto' was renamed 'loss'; use that"):
        load_config(CONFIGS / "toy.yaml", ["sail.select=auto"])
