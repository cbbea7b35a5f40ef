import pytest

from fmrisynth.config import Config, load_config, save_config
from fmrisynth.errors import FmrisynthError


def test_defaults_work():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.clip_len == 20 and cfg.diffusion.beta_start == 0.0015


def test_yaml_then_cli_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\ndata: {grid: 2mm, clip_len: 10}\ntrain: {steps: 7}\n")
    cfg = load_config(f, ["train.steps=9", "data.split=0.5,0.25,0.25", "train.max_minutes=none"])
    assert cfg.seed == 3 and cfg.data.grid == "2mm" and cfg.data.clip_len == 10
    assert cfg.train.steps == 9  # the command line wins over the YAML file
    assert cfg.data.split == (0.5, 0.25, 0.25) and cfg.train.max_minutes is None


def test_roundtrip(tmp_path):
    cfg = load_config(None, ["sim.runs=LR", "vae.adv_weight=0.5"])
    again = load_config(save_config(cfg, tmp_path / "config.yaml"))
    assert again == cfg and again.sim.runs == ("LR",)


@pytest.mark.parametrize(
    "override, words",
    [("train.stepz=3", "unknown key 'stepz'"), ("train.steps=abc", "cannot read 'abc'"), ("nosuch.x=1", "unknown section")],
)
def test_bad_override_is_one_clear_error(override, words):
    with pytest.raises(FmrisynthError, match=words):
        load_config(None, [override])


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(FmrisynthError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(FmrisynthError, match="not valid YAML"):
        load_config(bad)
