import re

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


@pytest.mark.parametrize("text", ["train: {lr: .nan}", "train: {lr: .inf}", "diffusion: {guidance: -.inf}"])
def test_non_finite_floats_in_yaml_are_refused(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text + "\n")
    with pytest.raises(FmrisynthError, match="is not a finite number"):
        load_config(f)


@pytest.mark.parametrize(
    "override, words",
    [("train.batch_size=0", "train.batch_size: must be an integer >= 1, got 0"), ("train.steps=0", "train.steps: must be an integer >= 1"),
     ("train.grad_accum=0", "train.grad_accum: must be an integer >= 1"), ("train.keep_ckpts=0", "train.keep_ckpts: must be an integer >= 1"),
     ("vae_train.batch_size=0", "vae_train.batch_size: must be an integer >= 1"),
     ("vae_train.warmup_steps=-1", "vae_train.warmup_steps: must be an integer >= 0"),
     ("train.lr=-1e-4", "train.lr: must be a finite number > 0"), ("vae_train.lr=0", "vae_train.lr: must be a finite number > 0"),
     ("train.lr=nan", "train.lr: nan is not a finite number"),
     ("train.ema_decay=1", "train.ema_decay: must be in [0, 1)"), ("train.amp=fp8", "train.amp: must be auto, bf16 or off"),
     ("train.max_minutes=0", "train.max_minutes: must be a finite number > 0 or none"),
     ("train.steps=yes", "cannot read True as int"), ("seed=-1", "seed: must be >= 0"),
     ("sim.subjects=0", "sim.subjects: must be >= 1"), ("data.clip_len=0", "data.clip_len: must be >= 1"),
     ("data.split=0,0,0", "data.split"), ("vae.codebook_size=0", "vae.codebook_size: must be >= 1"),
     ("diffusion.sample_steps=0", "diffusion.sample_steps: must be >= 1"),
     ("diffusion.cond_drop=1.5", "diffusion.cond_drop: must be in [0, 1]"),
     ("diffusion.beta_end=0.0001", "beta_start/beta_end")],
)  # fmt: skip
def test_values_no_stage_can_run_with_are_refused_on_load(override, words):
    """Every config value refusal, once; the verbs resolve the config through here before creating
    anything (test_guards), so each rule holds for every verb."""
    with pytest.raises(FmrisynthError, match=re.escape(words)) as e:
        load_config(None, [override])
    assert len(str(e.value).splitlines()) == 1 and str(e.value).startswith("config ")


def test_every_packaged_and_shipped_config_is_valid():
    from pathlib import Path

    from fmrisynth.config import packaged_config

    shipped = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    for path in [packaged_config("demo"), *shipped]:
        load_config(path)
