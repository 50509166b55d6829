import pytest

from common.config import Config, ConfigError, from_dict, load_config, to_dict


def test_defaults_file_and_overrides_apply_in_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: 7\n  lr: 0.001\ndata:\n  crop: [64, 64, 64]\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(child, ["train.lr=5e-4", "data.scheme=seed3", "distill.perturb.noise_std=0"])
    assert cfg.train.epochs == 3  # child beats base
    assert cfg.train.lr == pytest.approx(5e-4)  # override beats files
    assert cfg.data.crop == [64, 64, 64]  # inherited from base
    assert cfg.data.scheme == "seed3"
    assert cfg.distill.perturb.noise_std == 0.0 and isinstance(cfg.distill.perturb.noise_std, float)
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set data\.crops=1: unknown config key 'data\.crops'"):
        load_config(None, ["data.crops=1"])
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(None, ["nope.x=1"])


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="'train.epochs' must be int"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="'data.crop' must be a list"):
        load_config(None, ["data.crop=5"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.epochs"])
    cfg = load_config(None, ["data.dir=null", "train.steps_per_epoch=4"])
    assert cfg.data.dir is None and cfg.train.steps_per_epoch == 4


def test_missing_and_looping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)


def test_dict_round_trip():
    cfg = load_config(None, ["train.epochs=2", "model.overrides={decoder_dim: 32}"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert again.model.overrides == {"decoder_dim": 32}



def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files, "no configs shipped"
    for path in files:
        load_config(path)  # raises on any unknown key


def test_unquoted_off_reads_as_text_for_text_fields():
    """YAML 1.1 turns an unquoted `off` into False; `--set train.amp=off` must still mean "off"."""
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(None, ["train.amp=bf16"]).train.amp == "bf16"
    with pytest.raises(ConfigError, match="log_images"):
        load_config(None, ["train.log_images=fast"])  # a bool field still refuses text
