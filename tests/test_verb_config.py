"""Every verb reads its config one way (``config_from``): bad config is refused in one line before
any work, and ``sample`` honours --config/--set and writes the config it ran with (issue 20, item 4)."""

from pathlib import Path

import pytest
import yaml

from fmrisynth.cli import HANDLERS, main
from fmrisynth.config import Config, DiffusionConfig, save_config


def verb_args(verb: str, tmp: Path) -> list[str]:
    """The least each verb needs on its command line; every input is missing, so only config is checked first."""
    out = ["--out", str(tmp / "out")]
    return {
        "simulate": out,
        "prepare": ["--source", "hcp", str(tmp / "data"), *out],
        "train-vae": ["--store", str(tmp / "store"), *out],
        "train": ["--latents", str(tmp / "latents"), *out],
        "sample": ["--checkpoint", str(tmp / "run"), "--condition", "A", *out],
        "evaluate": ["--real", str(tmp / "store"), "--generated", str(tmp / "gen"), *out],
        "report": ["--eval", str(tmp / "eval"), "--out", str(tmp / "out.html")],
        "demo": out,
        "scale": ["--sizes", "tiny,s1m", *out],
        "presets": [],
    }[verb]


@pytest.mark.parametrize("verb", sorted(HANDLERS))
@pytest.mark.parametrize("bad, message", [(["--set", "nonsense.key=1"], "unknown section 'nonsense'"),
                                          (["--set", "train.nonsense=1"], "unknown key 'nonsense'"),
                                          (["--config", "missing.yaml"], "config file not found")])  # fmt: skip
def test_every_verb_refuses_a_bad_config_in_one_line_before_any_work(verb, bad, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([verb, *verb_args(verb, tmp_path), *bad]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def run(tmp_path):
    """A run folder as `train` leaves it, as far as `sample`'s config needs: a checkpoint and its config."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "weights.safetensors").write_bytes(b"")
    save_config(Config(seed=7, diffusion=DiffusionConfig(sample_steps=4, sampler="ddpm", guidance=1.5)), ckpt / "config.yaml")
    return tmp_path / "run"


@pytest.fixture
def calls(monkeypatch):
    """What the CLI passes to the generator; the generator itself is tested in test_diffusion_stage2."""
    from fmrisynth.generate import sample as gen

    seen = []

    def record(*args, **kwargs):
        Path(args[4] if len(args) > 4 else args[3]).mkdir(parents=True, exist_ok=True)
        seen.append(kwargs)
        return []

    monkeypatch.setattr(gen, "sample", record)
    monkeypatch.setattr(gen, "sample_runs", record)
    return seen


def test_sample_takes_the_runs_settings_then_yaml_set_and_flags_and_writes_its_config(run, calls, tmp_path):
    out = tmp_path / "samples"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("diffusion: {guidance: 3.0}\n")
    args = ["sample", "--checkpoint", str(run), "--condition", "A", "--out", str(out), "--config", str(recipe)]
    assert main(args + ["--set", "diffusion.sample_steps=3"]) == 0
    assert {k: calls[-1][k] for k in ("steps", "sampler", "guidance", "seed")} == {"steps": 3, "sampler": "ddpm",
                                                                                "guidance": 3.0, "seed": 7}  # fmt: skip
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["diffusion"]["sample_steps"] == 3 and written["diffusion"]["guidance"] == 3.0 and written["seed"] == 7
    assert main(args + ["--set", "diffusion.sample_steps=3", "--steps", "5", "--seed", "2"]) == 0  # a flag beats --set
    assert calls[-1]["steps"] == 5 and calls[-1]["seed"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["diffusion"]["sample_steps"] == 5


def test_sample_runs_mode_honours_set_too(run, calls, tmp_path):
    out = tmp_path / "runs"
    args = ["sample", "--checkpoint", str(run), "--events", str(tmp_path / "e.tsv"), "--tr", "1", "--frames", "10",
            "--out", str(out), "--set", "diffusion.sample_steps=3"]  # fmt: skip
    assert main(args) == 0 and calls[-1]["steps"] == 3 and calls[-1]["sampler"] == "ddpm"
    assert yaml.safe_load((out / "config.yaml").read_text())["diffusion"]["sample_steps"] == 3
