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


def test_a_config_that_is_no_yaml_text_is_named_with_what_it_is(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)))
    with pytest.raises(ConfigError, match=r"binary.yaml: not a YAML text file \(byte 8 is not UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    with pytest.raises(ConfigError, match="empty.yaml: empty .*leave --config out"):
        load_config(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 3, column 2") as err:
        load_config(bad)
    assert "\n" not in str(err.value)  # one line


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


@pytest.mark.parametrize("override, message", [
    ("data.scheme=foo", "data.scheme='foo': one of regions, seed3"),
    ("data.fg_ratio=2", "data.fg_ratio=2.0: a fraction in [0, 1]"),
    ("data.folds=3", None),  # fine on its own
    ("data.fold=3", "data.fold=3: a fold of data.folds=1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("data.samples_per_epoch=0", "data.samples_per_epoch=0: must be >= 1 (or null)"),
    ("model.width=0", "model.width=0.0: must be in (0, 1]"),
    ("model.width=1.5", "model.width=1.5: must be in (0, 1]"),
    ("train.lr=-1", "train.lr=-1.0: must be > 0"),
    ("train.min_lr=1", "train.min_lr=1.0: in [0, train.lr=0.0001]"),
    ("train.warmup_epochs=-3", "train.warmup_epochs=-3: must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: must be >= 0 (or null)"),
    ("train.patience=-1", "train.patience=-1: must be >= 0 (or null)"),
    ("train.val_every=0", "train.val_every=0: must be >= 1"),
    ("train.sw_batch=0", "train.sw_batch=0: must be >= 1"),
    ("train.threads=0", "train.threads=0: must be >= 1 (or null)"),
    ("train.device=gpu", "train.device='gpu': auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:1", None),
    ("train.amp=fp8", "train.amp='fp8': one of auto, off, fp16, bf16"),
    ("train.amp=yes", "train.amp='on': one of auto, off, fp16, bf16 (--set train.amp=yes)"),  # YAML 1.1 bool
    ("train.amp=bf16", None),
    ("guard.max_region_drop=2", "guard.max_region_drop=2.0: a fraction in [0, 1]"),
    ("distill.perturb.prob=1.5", "distill.perturb.prob=1.5: a fraction in [0, 1]"),
])
def test_values_out_of_range_are_refused_when_the_config_loads(override, message):
    """Before any work: these failed after a training epoch (sw_batch), in a library traceback (device,
    lr, num_workers, scheme), after the data was prepared (amp) or ran on silently (fg_ratio, warmup, patience, threads, width)."""
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)


def test_a_bad_value_names_the_file_or_the_set_it_came_from(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("train:\n  epochs: -1\n")
    with pytest.raises(ConfigError, match=rf"^train.epochs=-1: .* \(from {cfg}\)$"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"^train.epochs=-3: .* \(--set train.epochs=-3\)$"):
        load_config(cfg, ["train.epochs=-3"])
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  val_every: 0\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=rf"^train.val_every=0: must be >= 1 \(from {child}\)$"):
        load_config(child)  # the chain's values are the file's
