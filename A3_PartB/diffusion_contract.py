"""The contract of diffusion.py: what any correct file written to the starter's skeleton does.

Point it at any diffusion.py (the one beside it is the default):

    A3_DIFFUSION=path/to/diffusion.py python -m pytest A3_PartB/diffusion_contract.py
    python -m pytest diffusion_contract.py        # in A3_PartB: its own diffusion.py

The notebook runs it before training through ``contract_check.check_before_training``.

Only the skeleton's public names are used: ``extract``, ``cosine_schedule``,
``unnormalize_to_zero_to_one`` and ``Diffusion(model, *, image_size, channels, timesteps)``
with ``model``, ``image_size``, ``channels``, ``num_timesteps``, ``noise_like``, ``q_sample``,
``p_losses``, ``p_sample``, ``p_sample_loop``, ``sample`` and ``forward``. Noise is always
passed explicitly, the schedule may be plain tensors or buffers, and values are compared in
float32 to 1e-4 relative, against the handout's math (typos corrected, see ``Handout`` in
diffusion_reference.py) in float64. The network is a stub whose prediction is known, and
``noise_like`` is replaced by zeros, ones or a seeded generator, as the course's graders do.
Time steps are 0-based: t = 0 .. T-1 in code is the handout's 1 .. T.

Causes are named first: every random draw must go through ``noise_like`` (checked before the
equations, and named in an equation's failure when it is the likely cause). Every check runs as
on a machine without a GPU; then the file is judged on each device the trainer picks by default
(CUDA, Apple's MPS), simulated on the ``meta`` device, which every machine has, with CUDA's rule
that an op's tensors share one device. A file that runs there but chooses its device itself
instead of from its input gets a PortabilityWarning, not a failure (simulated_devices.py).

Each check hands its inputs to one probe (diffusion_probes.py: it calls the file and returns
data) and judges the answer, so that a grader runs the file in its box and judges in a process
that never imports it (contract_probes.py). Each check has a ``weight`` in Part B's points: the
values of the handout's equations on inputs drawn afresh weigh the most; a check of a shape, a
range, a device, the file compared with itself or what the box observed (the simulated device,
the stub network's calls) ``rests_on`` the values it belongs to and scores only when they pass.
"""

import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from contract_probes import NOT_RUN, rests_on, run, seeded, weight  # noqa: F401 - run is the checks' fixture
from diffusion_probes import (BATCH, CHANNELS, known_noise_prediction, load_under_test, METHODS, probe_cosine_schedule,
                              probe_draws_outside_noise_like, probe_extract, probe_forward, probe_gradient_of_p_losses,
                              probe_noise_like, probe_on_another_device, probe_on_the_trainers_device, probe_p_losses_at_each_t,
                              probe_p_sample, probe_p_sample_loop, probe_q_sample, probe_q_sample_beside_the_schedule,
                              probe_sample, probe_settings, probe_unnormalize, seeded_draws, SIZE, steps, T)
from diffusion_reference import Handout
from simulated_devices import PortabilityWarning

DEFAULT_FILE = Path(__file__).resolve().parent / "diffusion.py"
RTOL = 1e-4
ATOL = 1e-6  # for values that are 0 or nearly so
# eq. (8) divides x_t by sqrt(abar_t), about 1e-3 at t = T-1: float32 round-off of x_t (1e-7)
# grows a thousandfold in x0_hat, and reaches the reverse process's values as a few 1e-6.
ATOL_REVERSE = 2e-5


@pytest.fixture(scope="module")
def under_test():
    """The diffusion.py named by $A3_DIFFUSION, else this package's own."""
    path = Path(os.environ.get("A3_DIFFUSION") or DEFAULT_FILE).resolve()
    if not path.is_file():
        pytest.fail(f"A3_DIFFUSION={path} is not a file; set it to your diffusion.py", pytrace=False)
    return load_under_test(path)


HANDOUT = Handout(T)


def checked_on_the_cpu(method):
    """The checks of ``method``'s values, on which its other checks rest."""
    return {
        "q_sample": (test_q_sample_mean_is_sqrt_abar_t_times_x0, test_q_sample_std_is_sqrt_one_minus_abar_t),
        "p_losses": (test_p_losses_is_the_mean_l1_distance_between_noise_and_prediction,),
        "forward": (test_forward_is_the_l1_loss_at_the_steps_it_draws,),
        "p_sample": (test_p_sample_mean_is_the_posterior_mean_of_eq_7_at_every_t,
                     test_p_sample_adds_sigma_t_times_the_noise_at_every_t_above_0),
        "p_sample_loop": (test_p_sample_loop_follows_algorithm_2_and_returns_x0_in_zero_to_one,),
        "sample": (test_sample_runs_algorithm_2_from_x_T_drawn_by_noise_like,),
    }[method]


def generator(seed):
    """The generator of a check's inputs for its ``seed``, offset afresh for each grading
    (contract_probes.seeded): every input helper here draws through it."""
    return torch.Generator().manual_seed(seeded(seed))


def noise_drawn(seed):
    """noise_like's draws for a check's ``seed``: those the probe makes from ``seeded(seed)``
    (diffusion_probes.seeded_draws)."""
    return seeded_draws(seeded(seed))


def images(batch, seed):
    """Values in [-1, 1), fixed by ``seed``."""
    return torch.rand(batch, CHANNELS, SIZE, SIZE, generator=generator(seed)) * 2 - 1


def assert_rows_close(what, actual, expected, labels, *, atol=ATOL, draws=""):
    """Fail unless |actual - expected| <= atol + RTOL |expected| everywhere.

    Row k of both tensors belongs to ``labels[k]`` (a time step, mostly); the message names
    ``what`` (the equation), the rows that are off and the worst one with its relative error,
    and, where ``draws`` (GlobalDraws.places) names random numbers drawn outside noise_like, that cause.
    """
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = expected.double()
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    rows = len(labels)
    error = (actual - expected).abs().nan_to_num(nan=math.inf).reshape(rows, -1)
    allowed = (atol + RTOL * expected.abs()).reshape(rows, -1)
    ratio = error / allowed
    if bool((ratio <= 1).all()):
        return
    worst_row = int(ratio.amax(dim=1).argmax())
    worst = int(ratio[worst_row].argmax())
    got = actual.reshape(rows, -1)[worst_row, worst].item()
    wanted = expected.reshape(rows, -1)[worst_row, worst].item()
    off = [str(labels[k]) for k in range(rows) if ratio[k].max() > 1]
    where = ", ".join(off) if len(off) <= 6 else f"{len(off)} of {rows}, {off[0]} .. {off[-1]}"
    cause = (f". Likely cause: random numbers drawn outside noise_like ({draws}), so the noise was not the test's"
             if draws else "")
    pytest.fail(
        f"{what} is off at {where}. Worst at {labels[worst_row]}: got {got:.7g}, expected "
        f"{wanted:.7g}, relative error {error[worst_row, worst].item() / max(abs(wanted), atol):.3g} "
        f"(tolerance {RTOL:g} relative, {atol:g} absolute){cause}", pytrace=False)


def at_each_t(ts):
    return [f"t={t}" for t in ts]



# ---- module functions


def uniform(count, seed):
    """``count`` values in [0, 1), fixed by ``seed``."""
    return torch.rand(count, generator=generator(seed))


def test_extract_picks_one_entry_per_sample_shaped_to_broadcast(run, request):
    rests_on(request, test_q_sample_mean_is_sqrt_abar_t_times_x0)
    values = uniform(4, seed=50)
    t = torch.randperm(4, generator=generator(51))[:3]
    picked = run(probe_extract, values=values, t=t, shape=(3, CHANNELS, SIZE, SIZE))
    assert tuple(picked.shape) == (3, 1, 1, 1)
    assert picked.flatten().tolist() == values[t].tolist()


def test_unnormalize_maps_minus_one_to_one_onto_zero_to_one(run, request):
    rests_on(request, test_p_sample_loop_follows_algorithm_2_and_returns_x0_in_zero_to_one)
    x = torch.cat([torch.tensor([-1.0, -0.5, 0.0, 1.0]), uniform(6, seed=52) * 2 - 1])
    unnormalized = run(probe_unnormalize, x=x)
    assert unnormalized[:4].tolist() == [0.0, 0.25, 0.5, 1.0]
    assert torch.allclose(unnormalized, (x + 1) / 2, rtol=0, atol=1e-7), f"{unnormalized.tolist()} for {x.tolist()}"


def schedule_settings(case):
    """(T, s, atol) of a schedule: the course's, or one drawn afresh for each grading (a few
    steps, another s, a thousand steps)."""
    draw = uniform(2, seed=53 + len(case))
    return {"course": (T, 0.008, ATOL),
            "few_steps": (5 + int(draw[0] * 16), 0.008, ATOL),
            "another_s": (T, round(0.02 + 0.18 * draw[1].item(), 4), ATOL),
            "many_steps": (1000, 0.008, 1e-4)}[case]


@weight(3)
@pytest.mark.parametrize("case", ["course", "few_steps", "another_s", "many_steps"])
def test_cosine_schedule_is_eq_3(run, case):
    """eq. (3): alpha_t = clip(abar(t) / abar(t-1), 0.001, 1), abar(t) = f(t) / f(0).

    With T = 1000, float32 keeps only about 4 digits of f near t = T, where the cosine is
    near 0: there the graders' absolute 1e-4 applies."""
    timesteps, s, atol = schedule_settings(case)
    alphas = run(probe_cosine_schedule, timesteps=timesteps, settings={"s": s})
    assert_rows_close(f"eq. (3) alpha_t (T={timesteps}, s={s})", alphas,
                      Handout(timesteps, s).alpha, at_each_t(range(timesteps)), atol=atol)


def test_cosine_schedule_clips_alphas_to_between_0_001_and_1(run, request):
    """eq. (3)'s clip: abar(T) / abar(T-1) is about 0, so the last alpha is clipped up to 0.001."""
    rests_on(request, (test_cosine_schedule_is_eq_3, "course"))
    alphas = run(probe_cosine_schedule, timesteps=T, settings={}).double()
    assert alphas[-1].item() == pytest.approx(0.001, rel=RTOL)
    assert alphas.min().item() >= 0.001 * (1 - RTOL) and alphas.max().item() <= 1


# ---- randomness: graders replace noise_like, so every draw must go through it


@pytest.mark.parametrize("method", ["p_sample", "p_sample_loop", "sample", "q_sample", "p_losses"])
def test_every_random_draw_goes_through_noise_like(run, request, method):
    """The skeleton: all noise is drawn through noise_like, so graders can replace it; a draw
    from torch's global generator (torch.randn, randn_like, ...) makes every check of the equations that
    follow compare against noise the method did not use. Seen where it was drawn, and in the
    results: with noise_like replaced by the same draws, two seeds of torch's global generator
    give the same result. q_sample and p_losses are checked where noise may be left out; a method
    that requires noise draws none."""
    rests_on(request, *checked_on_the_cpu(method))
    answer = run(probe_draws_outside_noise_like, method=method, x=images(BATCH, seed=40),
                 global_seeds=[seeded(41), seeded(42)], noise_seed=seeded(43))
    if answer is None:
        return
    fix = "Draw them with self.noise_like(shape, device): graders replace it"
    if answer["places"]:
        pytest.fail(f"{method} drew random numbers outside self.noise_like: {answer['places']}. {fix}", pytrace=False)
    first, second = (torch.as_tensor(result).double() for result in answer["results"])
    if first.shape != second.shape or not torch.allclose(first, second, rtol=0, atol=0, equal_nan=True):
        pytest.fail(f"{method} gave two results for one noise_like draw under two seeds of torch's global "
                    f"generator: it draws random numbers outside self.noise_like. {fix}", pytrace=False)


# ---- forward process and training (Algorithm 1)


def test_diffusion_keeps_its_network_and_settings(run, request):
    rests_on(request, test_q_sample_mean_is_sqrt_abar_t_times_x0)
    answer = run(probe_settings, image_size=6, channels=2, timesteps=7)
    assert answer["keeps_network"], "Diffusion(model, ...).model is not the network it was given"
    assert tuple(answer["settings"]) == (6, 2, 7), (
        f"image_size, channels, num_timesteps are {tuple(answer['settings'])}, not (6, 2, 7)")


@weight(2)
def test_abar_is_the_running_product_of_the_clipped_alphas(run, request):
    """eq. (6): abar_t = alpha_0 ... alpha_t over cosine_schedule's clipped alphas, not f(t)/f(0);
    seen as q_sample(1, t, 0) = sqrt(abar_t)."""
    rests_on(request, (test_cosine_schedule_is_eq_3, "course"))
    x_0 = torch.ones(T, CHANNELS, SIZE, SIZE)
    answer = run(probe_q_sample_beside_the_schedule, x_0=x_0, t=torch.arange(T), noise=torch.zeros_like(x_0))
    expected = torch.cumprod(answer["alphas"].double(), 0).sqrt().view(T, 1, 1, 1).expand(x_0.shape)
    sqrt_abar = answer["x_t"]
    assert_rows_close("eq. (6) sqrt(abar_t), abar_t the product of the clipped alphas",
                      sqrt_abar, expected, at_each_t(range(T)))


@weight(4)
def test_q_sample_mean_is_sqrt_abar_t_times_x0(run):
    """eq. (6) / Algorithm 1 line 5: E[x_t | x_0] = sqrt(abar_t) x_0 (abar_t, not alpha_t)."""
    x_0 = images(T, seed=1)
    mean = run(probe_q_sample, x_0=x_0, t=torch.arange(T), noise=torch.zeros_like(x_0))
    expected = HANDOUT.q_sample(x_0.double(), torch.arange(T), 0.0)
    assert_rows_close("eq. (6) mean sqrt(abar_t) x_0", mean, expected, at_each_t(range(T)))


@weight(4)
def test_q_sample_std_is_sqrt_one_minus_abar_t(run):
    """eq. (6) / Algorithm 1 line 5: x_t - sqrt(abar_t) x_0 = sqrt(1 - abar_t) eps."""
    noise = images(T, seed=2)
    spread = run(probe_q_sample, x_0=torch.zeros_like(noise), t=torch.arange(T), noise=noise)
    expected = HANDOUT.q_sample(0.0, torch.arange(T), noise.double())
    assert_rows_close("eq. (6) std sqrt(1 - abar_t) eps", spread, expected, at_each_t(range(T)))


def l1_loss_at(t, x_0, noise):
    """Algorithm 1 line 6 for the stub network: mean |eps - eps_theta(x_t, t)|."""
    x_t = HANDOUT.q_sample(x_0.double(), t, noise.double())
    return (noise.double() - known_noise_prediction(x_t, t)).abs().mean()


@weight(5)
def test_p_losses_is_the_mean_l1_distance_between_noise_and_prediction(run):
    """Algorithm 1 lines 5-6: the network sees x_t of eq. (6) and t; the loss is L1, not L2."""
    x_0, noise = images(BATCH, seed=3), images(BATCH, seed=4)
    losses = run(probe_p_losses_at_each_t, x_0=x_0, noise=noise, ts=list(range(T)))
    expected = torch.stack([l1_loss_at(steps(t), x_0, noise) for t in range(T)])
    assert_rows_close("Algorithm 1 line 6, L1 loss", losses, expected, at_each_t(range(T)))


@weight(3)
def test_p_losses_gradient_at_the_network_is_the_l1_losses_gradient(run):
    """Algorithm 1 line 6 takes a gradient step on the loss: d loss / d theta of the stub network
    (eps_theta = theta * prediction, theta = 1) is mean(-sign(eps - eps_theta) prediction)."""
    x_0, noise = images(BATCH, seed=3), images(BATCH, seed=4)
    gradient = run(probe_gradient_of_p_losses, x_0=x_0, noise=noise, t=T // 2)
    assert gradient is not None, "no gradient of p_losses reaches the network"
    predicted = known_noise_prediction(HANDOUT.q_sample(x_0.double(), steps(T // 2), noise.double()), steps(T // 2))
    residual = noise.double() - predicted
    expected = (-residual.sign() * predicted).mean()
    ties = (2 * predicted.abs() * (residual.abs() < 1e-5)).sum() / residual.numel()  # the sign of about 0 is either
    assert gradient.numel() == 1 and abs(gradient.double().item() - expected.item()) <= 1e-5 + RTOL * abs(expected.item()) + ties, (
        f"the gradient of p_losses reaching the network is {gradient.flatten().tolist()}, expected "
        f"{expected.item():.7g} (the L1 loss of Algorithm 1 line 6)")


@weight(3)
def test_forward_is_the_l1_loss_at_the_steps_it_draws(run, request):
    """Algorithm 1: forward(x_0, noise) is p_losses at one random t per image."""
    rests_on(request, test_p_losses_is_the_mean_l1_distance_between_noise_and_prediction)
    x_0, noise = images(8, seed=5), images(8, seed=6)
    answer = run(probe_forward, x_0=x_0, noise=noise, seed=seeded(0))
    drawn = answer["drawn"]
    assert_rows_close(f"Algorithm 1 line 6, L1 loss at the drawn t={drawn.tolist()}",
                      answer["loss"].reshape(1), l1_loss_at(drawn, x_0, noise).reshape(1), ["forward"])


def test_forward_draws_t_uniformly_from_0_to_T_minus_1(run, request):
    """Algorithm 1 line 3: t ~ Uniform{1..T}, which is 0..T-1 in code; no step left out."""
    rests_on(request, test_forward_is_the_l1_loss_at_the_steps_it_draws)
    x_0 = images(40 * T, seed=7)
    drawn = run(probe_forward, x_0=x_0, noise=torch.zeros_like(x_0), seed=seeded(0))["drawn"]
    counts = torch.bincount(drawn, minlength=T)
    assert drawn.min().item() == 0 and drawn.max().item() == T - 1, (
        f"forward drew t from {drawn.min().item()} to {drawn.max().item()}; expected 0 to {T - 1}")
    assert counts.min().item() >= 10, f"some steps are rarely drawn: counts {counts.tolist()}"


# ---- reverse process (Algorithm 2)


def test_noise_like_draws_standard_normal_noise_of_the_given_shape(run, request):
    rests_on(request, test_sample_runs_algorithm_2_from_x_T_drawn_by_noise_like)
    noise = run(probe_noise_like, shape=(100, CHANNELS, 16, 16), seed=seeded(0))
    assert tuple(noise.shape) == (100, CHANNELS, 16, 16) and noise.dtype == torch.float32
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02


def the_same_x_at(ts, x):
    """``x`` as the state of p_sample at each of ``ts``."""
    return x.unsqueeze(0).expand(len(ts), *x.shape)


@weight(5)
def test_p_sample_mean_is_the_posterior_mean_of_eq_7_at_every_t(run):
    """Algorithm 2 lines 4-7 with z = 0: x0_hat by eq. (8) with abar_t, then eq. (7)'s mean
    with sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) on x_t."""
    x_0, eps = 0.9 * images(BATCH, seed=8), images(BATCH, seed=9)
    x_t = torch.stack([HANDOUT.q_sample(x_0.double(), steps(t), eps.double()).float() for t in range(T)])
    answer = run(probe_p_sample, x=x_t, ts=list(range(T)), cases=[(eps, "zeros")])
    expected = torch.stack([HANDOUT.posterior_mean(x_t[t].double(), t, eps.double()) for t in range(T)])
    assert_rows_close("eq. (7) posterior mean", answer["results"][0], expected, at_each_t(range(T)),
                      atol=ATOL_REVERSE, draws=answer["places"])


@weight(5)
def test_p_sample_adds_sigma_t_times_the_noise_at_every_t_above_0(run):
    """Algorithm 2 lines 8-9: x_{t-1} = mu_t + sigma_t z, sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t)
    (1 - alpha_t) (eq. 7); seen as p_sample with z = 1 minus p_sample with z = 0."""
    ts = list(range(1, T))
    answer = run(probe_p_sample, x=the_same_x_at(ts, images(BATCH, seed=10)), ts=ts,
                 cases=[("known", "ones"), ("known", "zeros")])
    shifts = answer["results"][0] - answer["results"][1]
    expected = HANDOUT.sigma[1:].view(-1, 1, 1, 1, 1).expand(shifts.shape)
    assert_rows_close("eq. (7) posterior std sigma_t", shifts, expected, at_each_t(ts), draws=answer["places"])


@weight(2)
def test_p_sample_adds_no_noise_at_t_0(run, request):
    """Algorithm 2 line 3: z = 0 at the last step; the output is the posterior mean itself."""
    rests_on(request, test_p_sample_mean_is_the_posterior_mean_of_eq_7_at_every_t)
    x = images(BATCH, seed=11)
    answer = run(probe_p_sample, x=the_same_x_at([0], x), ts=[0], cases=[("known", "ones"), ("known", "zeros")])
    shift = answer["results"][0] - answer["results"][1]
    assert_rows_close("Algorithm 2 line 3, z = 0 at the last step", shift, torch.zeros(1, *x.shape),
                      at_each_t([0]), draws=answer["places"])


@weight(2)
def test_p_sample_clamps_the_predicted_x0_to_minus_one_to_one(run, request):
    """Algorithm 2 line 6. With x_t = +-1 and eps = 0, eq. (8) gives |x0_hat| >= 1, and a
    prediction pushing x0_hat further out must not change the step; at t = 0, where eq. (7)'s
    mean is x0_hat itself, the step returns +-1."""
    rests_on(request, test_p_sample_mean_is_the_posterior_mean_of_eq_7_at_every_t)
    x = torch.where(images(BATCH, seed=12) >= 0, 1.0, -1.0)
    answer = run(probe_p_sample, x=the_same_x_at(range(T), x), ts=list(range(T)),
                 cases=[("beyond", "zeros"), (("linear", 0.0, 0.0), "zeros")])
    pushed, clamped = answer["results"]
    assert_rows_close("Algorithm 2 line 6, x0_hat clamped to [-1, 1] (the step moved with "
                      "x0_hat beyond the bounds)", pushed, clamped, at_each_t(range(T)), draws=answer["places"])
    assert_rows_close("Algorithm 2 line 6, x0_hat clamped to [-1, 1]", clamped[:1],
                      x.unsqueeze(0), at_each_t([0]), draws=answer["places"])


def test_p_sample_loop_takes_every_step_from_T_minus_1_down_to_0(run, request):
    """Algorithm 2 line 2: for t = T..1 (T-1..0 in code), one network call per step."""
    rests_on(request, test_p_sample_loop_follows_algorithm_2_and_returns_x0_in_zero_to_one)
    answer = run(probe_p_sample_loop, x_T=images(BATCH, seed=13), predict="known", noise="zeros")
    asked = [t.tolist() for t in answer["steps"]]
    assert asked == [[t] * BATCH for t in reversed(range(T))], (
        f"the network was asked about t = {[t[0] for t in asked]}; expected {T - 1} down to 0")


@weight(5)
def test_p_sample_loop_follows_algorithm_2_and_returns_x0_in_zero_to_one(run):
    """Algorithm 2 with seeded noise: every state x_t the network sees, then (x_0 + 1) / 2."""
    x_T = images(BATCH, seed=15)
    answer = run(probe_p_sample_loop, x_T=x_T, predict="known", noise=seeded(14))
    states, expected = HANDOUT.reverse_process(x_T, known_noise_prediction, noise_drawn(14))
    assert_rows_close("Algorithm 2, the state x_t", torch.stack(answer["states"]), states,
                      at_each_t(reversed(range(T))), atol=ATOL_REVERSE, draws=answer["places"])
    assert_rows_close("p_sample_loop's (x_0 + 1) / 2", answer["result"].unsqueeze(0), expected.unsqueeze(0),
                      ["the output"], atol=ATOL_REVERSE, draws=answer["places"])


def assert_in_zero_to_one(method, result):
    low, high = result.min().item(), result.max().item()
    assert low >= 0 and high <= 1, f"{method}'s images span [{low:.4g}, {high:.4g}], not [0, 1]"


def test_p_sample_loop_returns_images_in_zero_to_one_shaped_like_its_input(run, request):
    """Images are in [-1, 1] inside the model and in [0, 1] outside, whatever the network says."""
    rests_on(request, test_p_sample_loop_follows_algorithm_2_and_returns_x0_in_zero_to_one)
    x_T = 3 * images(BATCH, seed=17)
    result = run(probe_p_sample_loop, x_T=x_T, predict=("linear", 4.0, -3.0), noise=seeded(16))["result"]
    assert result.shape == x_T.shape
    assert_in_zero_to_one("p_sample_loop", result)


def test_sample_returns_batch_size_images_of_its_channels_and_size_in_zero_to_one(run, request):
    """Algorithm 2 on batch_size x channels x image_size x image_size noise, returned in [0, 1]."""
    rests_on(request, test_sample_runs_algorithm_2_from_x_T_drawn_by_noise_like)
    result = run(probe_sample, batch_size=3, settings={"channels": 2, "image_size": 5}, noise=None,
                 seed=seeded(0))["result"]
    assert tuple(result.shape) == (3, 2, 5, 5)
    assert_in_zero_to_one("sample", result)


@weight(3)
def test_sample_runs_algorithm_2_from_x_T_drawn_by_noise_like(run):
    """Algorithm 2 line 1: x_T ~ N(0, I) is noise_like's first draw."""
    answer = run(probe_sample, batch_size=BATCH, settings={}, noise=seeded(18), seed=seeded(0))
    draw = noise_drawn(18)
    _, expected = HANDOUT.reverse_process(draw((BATCH, CHANNELS, SIZE, SIZE)),
                                          known_noise_prediction, draw)
    assert_rows_close("sample's (x_0 + 1) / 2", answer["result"].unsqueeze(0), expected.unsqueeze(0),
                      ["the output"], atol=ATOL_REVERSE, draws=answer["places"])


# ---- devices: what a GPU would refuse, found without one


TRAINERS_DEVICES = ("cuda", "mps")  # besides the CPU, on which every check above runs (contract_probes.py)


@pytest.mark.parametrize("device_type", TRAINERS_DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_runs_on_each_device_the_trainer_picks(run, request, method, device_type):
    """A fault of the original starter: on a GPU every tensor an op gets must be on the model's
    device, so a tensor made on the CPU (torch.tensor(...), torch.full(...) without device=) crashes
    there though it runs on a CPU. Here the machine's best device is CUDA, then Apple's MPS, each
    simulated on the meta device: the file is imported afresh and the Diffusion built (so code
    behind torch.cuda.is_available() runs too), moved as the trainer moves it to the device it
    picks by default, and ``method`` called on inputs there, with CUDA's rule held for every op."""
    rests_on(request, *checked_on_the_cpu(method))
    name = {"cuda": "CUDA", "mps": "an Apple GPU (MPS)"}[device_type]
    answer = run(probe_on_the_trainers_device, method=method, device_type=device_type)
    if "beyond" in answer:
        pytest.skip(f"{NOT_RUN}: the meta device cannot run all of {answer['step']} ({answer['beyond']}); devices "
                    "were checked up to there")
    if "mixing" in answer:
        pytest.fail(f"{answer['step']} on {name}: {answer['mixing']}, with tensors on {device_type}. On such a "
                    "machine this raises; make it on the input's device (device=x.device) or register it as a buffer",
                    pytrace=False)
    if "crash" in answer:
        pytest.fail(f"{answer['step']} on {name} crashes: {answer['crash']}. "
                    "Code that runs only on a GPU (behind torch.cuda.is_available()) runs here as it would there",
                    pytrace=False)


@pytest.mark.parametrize("method", METHODS)
def test_takes_its_device_from_its_input(run, request, method):
    """The model put on another device than the machine's default (meta, on this CPU-only
    machine): a file that takes the device from its input follows it, one that chose it itself
    (torch.cuda.is_available(), a device picked at import) makes tensors on the default device.
    Such a file still runs wherever the trainer puts it by default, so this is a warning
    (PortabilityWarning) naming the line and the fix, never a failure."""
    rests_on(request, *checked_on_the_cpu(method))
    answer = run(probe_on_another_device, method=method)
    if "stopped" in answer:
        pytest.skip(f"{NOT_RUN}: {answer['step']} stops on the meta device ({answer['stopped']}), "
                    "which holds no values")
    if "mixing" in answer:
        mixing = answer["mixing"]
        warnings.warn(PortabilityWarning(
            f"{method} runs only on the device it picks itself: torch.{mixing['op']} at {mixing['here']} gets a "
            f"CPU tensor {mixing['made']}, when the model is on another device than the default. Take the "
            "device from the input (x.device) instead of torch.cuda.is_available() or a device chosen at import"))
