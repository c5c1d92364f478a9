"""Config loading: merge, overrides, typed validation with one-line errors naming the key."""
import pytest
import yaml

from conftest import write_yaml
from pipeline.core import layout
from pipeline.core.config import apply_overrides, config_hash, load_ensemble, load_experiment
from pipeline.core.errors import UserError


def test_experiment_merges_competition_and_overrides(tiny):
    cfg = load_experiment("configs/tiny/lenet5.yaml", ["train.epochs=7", "augment.preset=heavy"])
    assert cfg.name == "tiny" and cfg.experiment == "lenet5"
    assert cfg.data.id_column == "image_id" and cfg.image_size == 16
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 8
    assert cfg.augment.preset == "heavy"
    assert str(layout.Run.of(cfg.name, cfg.experiment).dir) == "runs/tiny/lenet5"


def test_experiment_overrides_competition_keys(tiny):
    write_yaml(tiny / "configs/tiny/big.yaml",
               {"competition": "competition.yaml", "model": {"backbone": "lenet5"},
                "image_size": 24, "data": {"image_suffix": ".jpg"}})
    cfg = load_experiment("configs/tiny/big.yaml")
    assert cfg.image_size == 24
    assert cfg.data.image_suffix == ".jpg" and cfg.data.id_column == "image_id"


@pytest.mark.parametrize("override, message", [
    (["train.epoch=3"], "configs/tiny/lenet5.yaml: train.epoch: unknown key"),
    (["train.epochs=three"], "configs/tiny/lenet5.yaml: train.epochs: "),
    (["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
    (["augment.preset=extreme"], "augment.preset: "),
    (["model.backbone=[1, 2]"], "model.backbone: "),
    (["model.drop_path_rate=1"], "model.drop_path_rate: Input should be less than 1"),
    (["epochs"], "override 'epochs': expected key=value"),
])
def test_bad_values_name_the_key(tiny, override, message):
    with pytest.raises(UserError) as err:
        load_experiment("configs/tiny/lenet5.yaml", override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_files_are_named(tiny):
    with pytest.raises(UserError, match="configs/tiny/nope.yaml: config file not found"):
        load_experiment("configs/tiny/nope.yaml")
    write_yaml(tiny / "configs/tiny/orphan.yaml",
               {"competition": "other.yaml", "model": {"backbone": "lenet5"}})
    with pytest.raises(UserError, match="configs/tiny/other.yaml: config file not found"):
        load_experiment("configs/tiny/orphan.yaml")


def test_missing_required_key(tiny):
    write_yaml(tiny / "configs/tiny/nomodel.yaml", {"competition": "competition.yaml"})
    with pytest.raises(UserError, match="nomodel.yaml: model: missing required key"):
        load_experiment("configs/tiny/nomodel.yaml")


def test_invalid_yaml_is_one_line(tiny):
    (tiny / "configs/tiny/broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml: invalid YAML") as err:
        load_experiment("configs/tiny/broken.yaml")
    assert "\n" not in str(err.value)


def test_override_values_are_data_not_code(tiny):
    data = apply_overrides({}, ["model.backbone=__import__('os').system('false')"])
    assert data["model"]["backbone"] == "__import__('os').system('false')"


def test_ensemble_config_and_hash(tiny):
    write_yaml(tiny / "configs/tiny/ensemble.yaml",
               {"competition": "competition.yaml", "experiments": ["lenet5"], "trials": 3})
    cfg = load_ensemble("configs/tiny/ensemble.yaml")
    assert cfg.experiments == ["lenet5"] and cfg.trials == 3
    a = load_experiment("configs/tiny/lenet5.yaml")
    b = load_experiment("configs/tiny/lenet5.yaml", ["train.lr=0.1"])
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(load_experiment("configs/tiny/lenet5.yaml"))


def test_shared_override_list_serves_every_stage(tiny):
    from pipeline.core.config import load_competition
    sets = ["train.epochs=3", "trials=9", "seed=5"]
    assert load_competition("configs/tiny/competition.yaml", sets).seed == 5
    assert load_experiment("configs/tiny/lenet5.yaml", sets).train.epochs == 3
    with pytest.raises(UserError, match="trian: unknown key"):
        load_competition("configs/tiny/competition.yaml", ["trian.epochs=3"])


def test_a_copied_config_folder_must_not_keep_the_old_name(tiny, capsys):
    import shutil
    from pipeline import folds
    shutil.copytree(tiny / "configs/tiny", tiny / "configs/tiny2")  # keeps `name: tiny`
    with pytest.raises(SystemExit) as stop:
        folds.main(["configs/tiny2/competition.yaml"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: configs/tiny2/competition.yaml: name: 'tiny' disagrees with its folder "
        "configs/tiny2; remove `name` (it is the folder's name)")
    assert not (tiny / "folds").exists()
    comp = yaml.safe_load((tiny / "configs/tiny2/competition.yaml").read_text())
    del comp["name"]
    write_yaml(tiny / "configs/tiny2/competition.yaml", comp)
    write_yaml(tiny / "configs/tiny2/lenet5.yaml", {"competition": "competition.yaml",
                                                    "name": "tiny", "model": {"backbone": "x"}})
    with pytest.raises(UserError, match="configs/tiny2/lenet5.yaml: name: 'tiny' disagrees"):
        load_experiment("configs/tiny2/lenet5.yaml")
    write_yaml(tiny / "configs/tiny2/lenet5.yaml", {"competition": "competition.yaml",
                                                    "model": {"backbone": "lenet5"}})
    cfg = load_experiment("configs/tiny2/lenet5.yaml")
    assert cfg.name == "tiny2" and str(layout.Run.of(cfg.name, cfg.experiment).dir) == "runs/tiny2/lenet5"


def test_mode_stack_fits_every_task_while_geometric_needs_probabilities(tiny):
    path = write_yaml(tiny / "configs/tiny/ensemble.yaml",
                      {"competition": "competition.yaml", "experiments": ["lenet5"],
                       "mode": "stack", "task": "regression", "metric": "rmse"})
    assert load_ensemble(path).mode == "stack"
    with pytest.raises(UserError, match="mode: geometric needs probabilities"):
        load_ensemble(path, ["mode=geometric"])
