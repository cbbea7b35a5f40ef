import pytest
import torch

from fmrisynth.config import DiffusionConfig
from fmrisynth.models.diffusion import Diffusion, make_betas
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.backbone import Backbone

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

SMALL = dict(widths=(8, 16), depths=(1, 1), kinds=("conv", "attn"), head_dim=8)
SHAPE = (2, 2, 4, 4, 4)  # (T, c, d, h, w)


def tiny_model(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return Backbone(channels=2, n_classes=2, **SMALL)


@pytest.mark.parametrize("schedule, monai_name", [("linear", "linear_beta"), ("scaled-linear", "scaled_linear_beta"), ("cosine", "cosine")])
def test_schedules_match_monai(schedule, monai_name):
    from monai.networks.schedulers import DDPMScheduler

    kwargs = {} if schedule == "cosine" else dict(beta_start=0.0015, beta_end=0.0195)
    ref = DDPMScheduler(1000, schedule=monai_name, **kwargs)
    ours = Diffusion(DiffusionConfig(schedule=schedule), null_label=2)
    assert torch.allclose(ours.alpha_bar.float(), ref.alphas_cumprod, atol=1e-5)  # betas differ by MONAI's float32
    assert make_betas(DiffusionConfig(schedule=schedule)).shape == (1000,)


@pytest.mark.parametrize("prediction, monai_type", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_matches_monai(prediction, monai_type, t):
    from monai.networks.schedulers import DDPMScheduler

    ref = DDPMScheduler(1000, schedule="linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False,
                        prediction_type=monai_type)  # fmt: skip
    ours = Diffusion(DiffusionConfig(prediction=prediction), null_label=2)
    x, out = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    expected, expected_x0 = ref.step(out, t, x, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))  # the noise MONAI drew
    got, x0 = ours.step(out, t, t - 1, x, eta=1.0, noise=noise)
    assert torch.allclose(got, expected, atol=1e-4) and torch.allclose(x0, expected_x0, atol=1e-4)


@pytest.mark.parametrize("prediction, monai_type", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_monai(prediction, monai_type, eta):
    from monai.networks.schedulers import DDIMScheduler

    ref = DDIMScheduler(1000, schedule="linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False,
                        prediction_type=monai_type)  # fmt: skip
    ref.set_timesteps(50)
    ours = Diffusion(DiffusionConfig(prediction=prediction), null_label=2)
    assert ours.timesteps(50) == ref.timesteps.tolist()
    x, out = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    for t in (999, 479, 19):
        expected, _ = ref.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(5))
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        got, _ = ours.step(out, t, t - 1000 // 50, x, eta=eta, noise=noise)
        assert torch.allclose(got, expected, atol=1e-4)


class Recorder(torch.nn.Module):
    """A stand-in denoiser that remembers the conditions it was given."""

    def forward(self, x, t, label, design):
        self.label, self.design = label.clone(), design.clone()
        return torch.zeros_like(x)


@pytest.mark.parametrize("cond_drop", [0.0, 1.0])
def test_dropped_condition_becomes_the_null_label_and_zero_design(cond_drop):
    model, label, design = Recorder(), torch.tensor([0, 1, 1]), torch.rand(3, 2) + 0.1
    Diffusion(DiffusionConfig(cond_drop=cond_drop), null_label=2).loss(model, torch.randn(3, *SHAPE), label, design)
    if cond_drop:
        assert (model.label == 2).all() and (model.design == 0).all()
    else:
        assert torch.equal(model.label, label) and torch.equal(model.design, design)


def test_guidance_mixes_conditional_and_unconditional_predictions():
    class Linear(torch.nn.Module):  # output = label, so cond = label and uncond = null
        def forward(self, x, t, label, design):
            return label.float().reshape(-1, 1, 1, 1, 1, 1).expand_as(x).clone()

    diffusion = Diffusion(DiffusionConfig(), null_label=2)
    x, label, design = torch.zeros(2, *SHAPE), torch.tensor([0, 1]), torch.rand(2, 2)
    assert torch.equal(diffusion.predict(Linear(), x, 10, label, design, guidance=1.0)[:, 0, 0, 0, 0, 0], torch.tensor([0.0, 1.0]))
    mixed = diffusion.predict(Linear(), x, 10, label, design, guidance=3.0)[:, 0, 0, 0, 0, 0]
    assert torch.allclose(mixed, 2 + 3 * (torch.tensor([0.0, 1.0]) - 2))  # uncond + g (cond - uncond)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_model_overfits_one_batch(prediction):
    """Fixed clip, timestep and noise: the loss must go to (near) zero, else the model cannot learn."""
    diffusion, model = Diffusion(DiffusionConfig(prediction=prediction), null_label=2), tiny_model()
    torch.manual_seed(1)
    x0, noise, t = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE), torch.tensor([100, 600])
    label, design = torch.tensor([0, 1]), torch.rand(2, 2)
    a, s = diffusion._coefs(t, x0)
    target = noise if prediction == "eps" else a * noise - s * x0
    x_t = diffusion.q_sample(x0, t, noise)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x_t, t, label, design), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01  # from ~1.0 at init


def test_condition_changes_the_output_after_a_few_steps():
    diffusion, model = Diffusion(DiffusionConfig(cond_drop=0.0), null_label=2), tiny_model()
    x, t, design = torch.randn(1, *SHAPE), torch.tensor([300]), torch.tensor([[1.0, 0.0]])
    assert torch.equal(model(x, t, torch.tensor([0]), design), model(x, t, torch.tensor([1]), design))  # zero-init
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        loss = diffusion.loss(model, torch.randn(4, *SHAPE), torch.tensor([0, 1, 0, 1]), torch.rand(4, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = [model(x, t, torch.tensor([y]), d) for y, d in [(0, design), (1, design), (0, design.flip(1))]]
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])  # label and design matter


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_by_seed(sampler):
    diffusion, model = Diffusion(DiffusionConfig(), null_label=2), tiny_model().eval()
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)  # a non-trivial denoiser
    label, design = torch.tensor([0, 1]), torch.rand(2, 2)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return diffusion.sample(model, label, design, SHAPE, steps=5, sampler=sampler, guidance=2.0, generator=g)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, *SHAPE) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_bad_diffusion_settings_are_clear_errors():
    with pytest.raises(FmrisynthError, match="noise schedule"):
        Diffusion(DiffusionConfig(schedule="quadratic"), null_label=2)
    with pytest.raises(FmrisynthError, match="prediction"):
        Diffusion(DiffusionConfig(prediction="x0"), null_label=2)
    diffusion = Diffusion(DiffusionConfig(), null_label=2)
    with pytest.raises(FmrisynthError, match="sampling steps"):
        diffusion.timesteps(0)
    with pytest.raises(FmrisynthError, match="sampler"):
        diffusion.sample(Recorder(), torch.tensor([0]), torch.zeros(1, 2), SHAPE, sampler="euler")


@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("weighting", ["plain", "min-snr"])
def test_reference_losses_match_the_best_linear_denoiser_by_monte_carlo(prediction, weighting):
    """The closed form equals the loss of the optimal per-element affine denoiser, simulated."""
    diffusion = Diffusion(DiffusionConfig(prediction=prediction, weighting=weighting), null_label=2)
    g = torch.Generator().manual_seed(0)
    s2 = torch.tensor([0.2, 1.0, 3.0]).repeat(2000)  # (E,) element variances
    ref = diffusion.reference_losses(s2)
    t = torch.randint(0, 1000, (s2.numel(),), generator=g)
    a2 = diffusion.alpha_bar[t]
    a, b = a2.sqrt(), (1 - a2).sqrt()
    x0, eps = torch.randn(s2.numel(), generator=g, dtype=torch.float64) * s2.sqrt(), torch.randn(s2.numel(), generator=g, dtype=torch.float64)
    xt = a * x0 + b * eps
    target = eps if prediction == "eps" else a * eps - b * x0
    cov = b if prediction == "eps" else a * b * (1 - s2)
    best = cov / (a2 * s2 + b**2) * xt  # E[target | x_t] for zero-mean Gaussian elements
    mc = float((diffusion.weights(t) * (target - best) ** 2).mean())
    assert mc == pytest.approx(ref["ref_loss_gaussian"], rel=0.05)


def test_untrained_v_model_scores_the_white_reference_on_white_data():
    """The direct path: with v-prediction a zero output is the best denoiser of unit white noise."""
    diffusion = Diffusion(DiffusionConfig(prediction="v", cond_drop=0.0), null_label=2)
    model = tiny_model()  # output layer zero-initialised
    torch.manual_seed(0)
    losses = [float(diffusion.loss(model, torch.randn(8, *SHAPE), torch.zeros(8, dtype=torch.long), torch.rand(8, 2)))
              for _ in range(10)]  # fmt: skip
    assert sum(losses) / len(losses) == pytest.approx(diffusion.reference_losses(torch.ones(1))["ref_loss_white"], rel=0.05)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_analytic_sampler_keeps_the_variance_of_white_data_where_ddim_loses_it(prediction):
    """With the exact denoiser of unit white data (zero v; eps = sqrt(1 - a) x_t) over 10 steps,
    DDIM shrinks every sample (cos of each angle step) while the analytic variance keeps 1."""
    d = Diffusion(DiffusionConfig(prediction=prediction), null_label=1)

    def exact(x, t, label, design):
        if prediction == "v":
            return torch.zeros_like(x)
        return (1 - d.alpha_bar[t].float()).sqrt().reshape(-1, 1, 1) * x

    label, design = torch.zeros(64, dtype=torch.long), torch.zeros(64, 8)
    var = {s: d.sample(exact, label, design, (8, 64), steps=10, sampler=s, generator=torch.Generator().manual_seed(0)).var().item()
           for s in ("ddim", "ddpm", "analytic")}  # fmt: skip
    assert abs(var["analytic"] - 1) < 0.03
    assert var["ddim"] < 0.85 and var["ddpm"] < 0.95


def test_measured_x0_error_is_one_for_the_exact_denoiser_of_white_data_and_below_for_a_better_one():
    d = Diffusion(DiffusionConfig(prediction="v"), null_label=1)
    white = [(torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(k)), torch.zeros(16, dtype=torch.long),
              torch.zeros(16, 8)) for k in range(2)]  # fmt: skip
    zero = lambda x, t, label, design: torch.zeros_like(x)  # noqa: E731  # the untrained model
    errors = d.measure_x0_error(zero, white, points=5)
    assert len(errors) == 1000 and max(abs(e - 1) for e in errors) < 0.05
    # data of a quarter the variance: at high noise x0 is pinned to the data's spread, 0.25 of white data's
    assert abs(d.measure_x0_error(zero, [(0.5 * x, lab, des) for x, lab, des in white], points=5)[-1] - 0.25) < 0.05
