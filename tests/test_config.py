"""Configuration errors a user can act on."""
import pytest

from ds_smoes.core.config import SMoESConfig, validate
from ds_smoes.core.errors import ConfigError
from ds_smoes.app.config import TrainConfig, load_train_config


@pytest.mark.parametrize("fields, message", [
    ({"num_experts": 8, "num_bins": 3, "ep_size": 1}, "num_bins=3 does not divide num_experts=8"),
    ({"num_experts": 8, "num_bins": 2, "ep_size": 4}, "num_bins=2 is not a multiple of ep_size=4"),
    ({"num_experts": 6, "num_bins": 2, "ep_size": 4}, "num_experts=6 is not divisible by ep_size=4"),
    ({"num_experts": 4, "k": 5, "num_bins": 2}, "k=5 exceeds num_experts=4"),
    ({"score_type": "cosine"}, "score_type: Input should be 'attention', 'gaussian' or 'hard'"),
    ({"num_bin": 2}, "num_bin: unknown field"),
    ({"num_experts": 8, "num_bins": 4, "k": 4, "max_bins_per_token": 1},
     "max_bins_per_token=1 bins of 2 experts leave 2 experts for k=4: set max_bins_per_token >= 2"),
    ({"num_bins": 2, "max_bins_per_token": 3}, "max_bins_per_token=3 exceeds num_bins=2"),
    ({"gate": "ltdr", "max_bins_per_token": 1}, "max_bins_per_token applies to gates with plain top-k"),
    ({"dispatch": "alltoall"}, "dispatch: Input should be 'deepspeed' or 'rank_once'"),
])
def test_smoes_config_rejects_with_message(fields, message):
    with pytest.raises(ConfigError) as err:
        validate(SMoESConfig, fields)
    assert message in str(err.value)


def test_valid_bins_are_suggested():
    with pytest.raises(ConfigError, match=r"valid num_bins for ep_size=2: \[2, 4, 8\]"):
        validate(SMoESConfig, {"num_experts": 8, "num_bins": 6, "ep_size": 2})


def test_config_file_paths_resolve_against_file(tmp_path):
    (tmp_path / "cfg.yaml").write_text("data:\n  image_folder: imgs\nsmoes:\n  num_bins: 2\n")
    cfg = load_train_config(tmp_path / "cfg.yaml", ["smoes.score_type=gaussian", "optim.lr=0.01"])
    assert cfg.data.image_folder == (tmp_path / "imgs").resolve()
    assert cfg.smoes.score_type == "gaussian" and cfg.optim.lr == 0.01


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_train_config(None, ["smoes.num_bins"])
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("smoes: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(tmp_path / "bad.yaml")


def test_demo_config_is_valid():
    cfg = load_train_config(__import__("pathlib").Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert isinstance(cfg, TrainConfig) and cfg.smoes.ep_size == 2


def test_unknown_fields_get_the_closest_accepted_names(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim: {epoch: 3}\nsmoes: {score: hard}\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    text = str(err.value)
    assert "optim.epoch: unknown field (did you mean 'epochs'?" in text
    assert "smoes.score: unknown field (did you mean 'score_type'?" in text   # nested section, its own fields
    with pytest.raises(ConfigError, match=r"smoes.zzzz: unknown field \(check the spelling"):
        load_train_config(None, ["smoes.zzzz=1"])


def test_a_bad_value_from_set_is_blamed_on_the_set_not_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("smoes: {num_experts: 8, ep_size: 2, num_bins: 2}\noptim: {lr: 0.001}\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path, ["smoes.num_bins=3", "optim.lr=-1"])
    lines = str(err.value).splitlines()
    assert any(l.strip().startswith("smoes:") and "[from --set smoes.num_bins=3]" in l for l in lines), lines
    assert any(l.strip().startswith("optim.lr:") and l.endswith("[from --set optim.lr=-1]") for l in lines), lines
    path.write_text("optim: {lr: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path, ["optim.epochs=2"])
    assert "optim.lr: Input should be greater than 0" in str(err.value) and "--set" not in str(err.value)


def test_whether_a_run_moves_experts_is_decided_in_one_place():
    from ds_smoes.core.config import SMoESConfig

    base = dict(num_experts=4, num_bins=2, ep_size=2, gate="smoes", binning="adaptive", placement="bins",
                rebin_freeze_step=150)
    assert SMoESConfig(**base).moves_experts(150) and not SMoESConfig(**base).moves_experts(149)
    for change in ({"ep_size": 1}, {"placement": "none"}, {"binning": "fixed"}, {"gate": "topk"}):
        assert not SMoESConfig(**{**base, **change}).moves_experts(10_000), change
    assert SMoESConfig(**base).adaptive_bins and not SMoESConfig(**{**base, "gate": "hard"}).adaptive_bins
