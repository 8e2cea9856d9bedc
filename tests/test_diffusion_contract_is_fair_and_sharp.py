"""The contract (A3_PartB/diffusion_contract.py) is fair and sharp, shown on known implementations.

Fair: it passes on this package's diffusion.py and on a second correct one written
independently in the skeleton's style (tests/skeleton_style_diffusion/diffusion.py: plain
tensor attributes, ``noise`` required, float32 math).
Sharp: each mutant below is that second file with one known mistake, and the contract fails it
in exactly the tests that check the step it gets wrong; the messages name the cause (a draw
outside noise_like, a schedule that is not one tensor, a CPU tensor with the line that made it).
One more edit is no mistake (reading t back with ``.item()``) and must pass: the meta device,
on which the contract checks devices, holds no values, and a GPU does.

The contract runs once per file, in one subprocess (torch is imported once), with
$A3_DIFFUSION naming the file, exactly as a student runs it.
"""

import re
from pathlib import Path

import pytest
import torch

from contract_verdicts import Mutant, verdicts, write_mutant
from diffusion import Diffusion
from diffusion_probes import load_diffusion_file, replace_noise, seeded_draws
from unet import Unet

TESTS = Path(__file__).resolve().parent
CONTRACT = TESTS.parent / "A3_PartB" / "diffusion_contract.py"
SKELETON_STYLE = TESTS / "skeleton_style_diffusion" / "diffusion.py"
CORRECT = {"ours": TESTS.parent / "A3_PartB" / "diffusion.py", "skeleton_style": SKELETON_STYLE}
STUDENT_DEVICES = TESTS / "devices_in_student_files"
DEVICE_CHOSEN_AT_IMPORT = STUDENT_DEVICES / "device_chosen_at_import" / "diffusion.py"
CUDA_ONLY_IN_INIT = STUDENT_DEVICES / "cuda_only_in_init" / "diffusion.py"
WITHOUT_MPS = Mutant("device_chosen_at_import_without_mps", (('else "mps" if torch.backends.mps.is_available() ', ""),),
                     {"test_runs_on_each_device_the_trainer_picks"})

POSTERIOR_MEAN = "test_p_sample_mean_is_the_posterior_mean_of_eq_7_at_every_t"
SIGMA = "test_p_sample_adds_sigma_t_times_the_noise_at_every_t_above_0"
LOOP = "test_p_sample_loop_follows_algorithm_2_and_returns_x0_in_zero_to_one"
SAMPLE = "test_sample_runs_algorithm_2_from_x_T_drawn_by_noise_like"
SAMPLE_RANGE = "test_sample_returns_batch_size_images_of_its_channels_and_size_in_zero_to_one"
THROUGH_NOISE_LIKE = "test_every_random_draw_goes_through_noise_like"
ON_THE_TRAINERS_DEVICES = "test_runs_on_each_device_the_trainer_picks"
SCHEDULE = ("test_cosine_schedule_is_eq_3", "test_cosine_schedule_clips_alphas_to_between_0_001_and_1")
ABAR = "test_abar_is_the_running_product_of_the_clipped_alphas"
Q_SAMPLE_MEAN = "test_q_sample_mean_is_sqrt_abar_t_times_x0"
L1 = ("test_p_losses_is_the_mean_l1_distance_between_noise_and_prediction",
      "test_p_losses_gradient_at_the_network_is_the_l1_losses_gradient", "test_forward_is_the_l1_loss_at_the_steps_it_draws")

MUTANTS = [
    Mutant("eq7_printed_typo_sqrt_abar_on_x_t",
           (("self.coef_xt = self.alphas.sqrt()", "self.coef_xt = self.alphas_bar.sqrt()"),),
           {POSTERIOR_MEAN, LOOP, SAMPLE}),
    Mutant("alpha_for_abar_in_algorithm_1_line_5",
           (("abar = extract(self.alphas_bar, t, x_0.shape)", "abar = extract(self.alphas, t, x_0.shape)"),),
           {ABAR, Q_SAMPLE_MEAN, "test_q_sample_std_is_sqrt_one_minus_abar_t", *L1}),
    Mutant("alpha_for_abar_in_algorithm_2_line_5",
           (("torch.rsqrt(self.alphas_bar)", "torch.rsqrt(self.alphas)"),
            ("torch.sqrt(1.0 / self.alphas_bar - 1.0)", "torch.sqrt(1.0 / self.alphas - 1.0)")),
           {POSTERIOR_MEAN, LOOP, SAMPLE}),
    Mutant("noise_added_at_the_last_step",
           (("if t_index > 0 else", "if t_index >= 0 else"),),
           {"test_p_sample_adds_no_noise_at_t_0", LOOP, SAMPLE, SAMPLE_RANGE}),
    Mutant("no_x0_clamp",
           (("        x0 = torch.clamp(x0, -1.0, 1.0)\n", ""),),
           {"test_p_sample_clamps_the_predicted_x0_to_minus_one_to_one", LOOP, SAMPLE, SAMPLE_RANGE}),
    Mutant("unclipped_alphas",
           ((".clamp(min=0.001, max=1.0)", ""),),
           {*SCHEDULE, Q_SAMPLE_MEAN, POSTERIOR_MEAN, SIGMA, LOOP, SAMPLE}),
    Mutant("abar_from_f_t_over_f_0",
           (("torch.cumprod(self.alphas, 0)",
             "torch.cos((torch.arange(1, timesteps + 1) / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2"
             " / math.cos(0.008 / 1.008 * math.pi / 2) ** 2"),),
           {ABAR, Q_SAMPLE_MEAN, POSTERIOR_MEAN}),
    Mutant("mse_for_l1",
           ((".abs().mean()", ".pow(2).mean()"),),
           set(L1)),
    Mutant("one_based_t_in_algorithm_1_t_from_1",
           (("torch.randint(0, self.num_timesteps", "torch.randint(1, self.num_timesteps"),),
           {"test_forward_draws_t_uniformly_from_0_to_T_minus_1"}),
    Mutant("one_based_t_in_algorithm_2_line_3_no_noise_at_t_1",
           (("if t_index > 0 else", "if t_index > 1 else"),),
           {SIGMA, LOOP, SAMPLE}),
    Mutant("one_based_t_in_algorithm_2_loop_stops_at_t_1",
           (("reversed(range(0, self.num_timesteps))", "reversed(range(1, self.num_timesteps))"),),
           {"test_p_sample_loop_takes_every_step_from_T_minus_1_down_to_0",
            "test_p_sample_loop_returns_images_in_zero_to_one_shaped_like_its_input", LOOP, SAMPLE,
            SAMPLE_RANGE}),
    Mutant("noise_like_draws_uniform_noise",
           (("return torch.randn(shape, device=device)", "return torch.rand(shape, device=device)"),),
           {"test_noise_like_draws_standard_normal_noise_of_the_given_shape"}),
    Mutant("x_T_drawn_outside_noise_like",
           (("self.p_sample_loop(self.noise_like(shape, device))",
             "self.p_sample_loop(torch.randn(shape, device=device))"),),
           {THROUGH_NOISE_LIKE, SAMPLE}),
    Mutant("z_drawn_outside_noise_like",
           (("z = self.noise_like(x.shape, x.device) if", "z = torch.randn_like(x) if"),),
           {POSTERIOR_MEAN, SIGMA, "test_p_sample_clamps_the_predicted_x0_to_minus_one_to_one", LOOP,
            SAMPLE, THROUGH_NOISE_LIKE}),
    Mutant("p_losses_without_gradient",
           (("    def p_losses(", "    @torch.no_grad()\n    def p_losses("),),
           {"test_p_losses_gradient_at_the_network_is_the_l1_losses_gradient"}),
    Mutant("q_sample_default_noise_drawn_outside_noise_like",
           (("def q_sample(self, x_0, t, noise):",
             "def q_sample(self, x_0, t, noise=None):\n        if noise is None:\n            noise = torch.randn_like(x_0)"),),
           {THROUGH_NOISE_LIKE}),
    Mutant("cosine_schedule_returns_alphas_and_abar",
           (("return (abar[1:] / abar[:-1]).clamp(min=0.001, max=1.0)",
             "alphas = (abar[1:] / abar[:-1]).clamp(min=0.001, max=1.0)\n    return alphas, torch.cumprod(alphas, 0)"),
            ("self.alphas = cosine_schedule(timesteps)\n        self.alphas_bar = torch.cumprod(self.alphas, 0)",
             "self.alphas, self.alphas_bar = cosine_schedule(timesteps)")),
           {*SCHEDULE, ABAR}),
    Mutant("cpu_tensor_made_inside_p_sample",
           (("x0 = torch.clamp(x0, -1.0, 1.0)",
             "x0 = torch.maximum(torch.minimum(x0, torch.tensor([1.0])), torch.tensor([-1.0]))"),),
           {ON_THE_TRAINERS_DEVICES}),
    Mutant("step_tensor_made_without_device_in_p_sample_loop",
           (("torch.full((b,), i, dtype=torch.long, device=img.device)", "torch.full((b,), i, dtype=torch.long)"),),
           {ON_THE_TRAINERS_DEVICES}),
    # not a mistake: a GPU reads values back, which meta tensors do not hold
    Mutant("correct_but_reads_t_back_with_item", (("if t_index > 0 else", "if t[0].item() > 0 else"),), set()),
    # not a mistake either: what needs a real GPU is a device check not run (skipped), not a failure
    # a real crash in code that runs only on a GPU fails on CUDA, as it would there
    Mutant("gpu_only_branch_with_a_shape_error",
           (("        abar = extract(self.alphas_bar, t, x_0.shape)\n        return abar.sqrt()",
             "        abar = extract(self.alphas_bar, t, x_0.shape)\n        if torch.cuda.is_available():\n"
             "            abar = abar.view(1, -1)\n        return abar.sqrt()"),), {ON_THE_TRAINERS_DEVICES}),
    Mutant("correct_but_pins_memory_in_sample",  # CUDA's driver, which no simulated GPU has
           (("        return self.p_sample_loop(self.noise_like(shape, device))",
             "        if torch.cuda.is_available():\n            torch.zeros(1).pin_memory()\n"
             "        return self.p_sample_loop(self.noise_like(shape, device))"),), set()),
    Mutant("correct_but_synchronizes_the_gpu_in_sample",
           (("        return self.p_sample_loop(self.noise_like(shape, device))",
             "        if torch.cuda.is_available():\n            torch.cuda.synchronize()\n"
             "        return self.p_sample_loop(self.noise_like(shape, device))"),), set()),
]


def without_parameters(failed):
    """{test name without its parameters: a failure message}: the mutants name tests, not cases."""
    return {name.split("[")[0]: message for name, message in failed.items()}


@pytest.fixture(scope="module")
def verdicts_by_file(tmp_path_factory):
    """{implementation name: the contract's failures on it}, from one run over every file."""
    folder = tmp_path_factory.mktemp("implementations")
    without_mps = write_mutant(DEVICE_CHOSEN_AT_IMPORT, folder / "device_chosen_at_import_without_mps", WITHOUT_MPS)
    return {name: without_parameters(failed) for name, failed
            in verdicts(CONTRACT, "A3_DIFFUSION", dict(CORRECT, device_chosen_at_import=DEVICE_CHOSEN_AT_IMPORT,
                                                       device_chosen_at_import_without_mps=without_mps,
                                                       cuda_only_in_init=CUDA_ONLY_IN_INIT),
                        SKELETON_STYLE, MUTANTS, folder).items()}


@pytest.mark.parametrize("name", CORRECT)
def test_contract_passes_on_a_correct_diffusion(verdicts_by_file, name):
    assert verdicts_by_file[name] == {}


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda mutant: mutant.name)
def test_contract_fails_a_mistake_in_the_tests_that_check_it(verdicts_by_file, mutant):
    assert set(verdicts_by_file[mutant.name]) == mutant.caught_by


def test_failure_names_the_equation_the_steps_off_and_the_worst_error(verdicts_by_file):
    """eq. (7)'s printed typo is harmless only at t = 0, where abar_t = alpha_t."""
    message = verdicts_by_file["eq7_printed_typo_sqrt_abar_on_x_t"][POSTERIOR_MEAN]
    assert "eq. (7) posterior mean is off at 49 of 50, t=1 .. t=49. Worst at t=" in message
    assert "relative error" in message and "(tolerance 0.0001 relative" in message


def test_our_diffusion_matches_the_skeleton_style_one_at_the_graders_tolerance():
    """The course's grader: every output of the skeleton's methods, on a real U-Net, under one
    global seed and with noise_like patched to a seeded generator, equal to atol = rtol = 1e-4."""
    torch.manual_seed(0)
    network = Unet(8, dim_mults=(1, 2))
    pair = [Diffusion(network, image_size=8, timesteps=20),
            load_diffusion_file(SKELETON_STYLE).Diffusion(network, image_size=8, timesteps=20)]
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise, t = torch.randn_like(x_0), torch.tensor([0, 7, 13, 19])

    def outputs(diffusion):
        torch.manual_seed(1)
        results = {"noise_like": diffusion.noise_like((4, 3, 8, 8), torch.device("cpu")),
                   "forward": diffusion(x_0, noise),
                   "q_sample": diffusion.q_sample(x_0, t, noise),
                   "p_losses": diffusion.p_losses(x_0, t, noise)}
        for name, method, arguments in [("p_sample", diffusion.p_sample, (x_0, torch.full((4,), 9), 9)),
                                        ("p_sample_loop", diffusion.p_sample_loop, (x_0,)),
                                        ("sample", diffusion.sample, (4,))]:
            replace_noise(diffusion, seeded_draws(0))
            results[name] = method(*arguments)
        return results

    ours, theirs = (outputs(diffusion) for diffusion in pair)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=1e-4,
                                   msg=lambda message, name=name: f"{name}: {message}")



def test_an_equation_off_because_of_draws_outside_noise_like_names_that_cause(verdicts_by_file):
    message = verdicts_by_file["z_drawn_outside_noise_like"][POSTERIOR_MEAN]
    assert message.startswith("Failed: eq. (7) posterior mean is off at 49 of 50")
    assert re.search(r"Likely cause: random numbers drawn outside noise_like \(torch.randn_like at diffusion.py:\d+ "
                     r"\(z = torch.randn_like\(x\) if t_index > 0 else torch.zeros_like\(x\)\)\), so the noise "
                     r"was not the test's$", message)


def test_a_draw_outside_noise_like_is_named_with_its_line(verdicts_by_file):
    message = verdicts_by_file["q_sample_default_noise_drawn_outside_noise_like"][THROUGH_NOISE_LIKE]
    assert re.match(r"Failed: q_sample drew random numbers outside self.noise_like: torch.randn_like at "
                    r"diffusion.py:\d+ \(noise = torch.randn_like\(x_0\)\)\. Draw them with self.noise_like", message)


def test_a_schedule_that_is_not_one_tensor_of_t_alphas_is_told_so_in_one_line(verdicts_by_file):
    message = verdicts_by_file["cosine_schedule_returns_alphas_and_abar"][ABAR]
    assert message == "Failed: cosine_schedule(50) returned a tuple of 2 items, not one tensor of the 50 alphas of eq. (3)"


def test_a_cpu_tensor_mixed_in_is_named_with_the_op_and_the_line_that_made_it(verdicts_by_file):
    made_inside = verdicts_by_file["cpu_tensor_made_inside_p_sample"][ON_THE_TRAINERS_DEVICES]
    left_on_cpu = verdicts_by_file["step_tensor_made_without_device_in_p_sample_loop"][ON_THE_TRAINERS_DEVICES]
    assert re.match(r"Failed: sample on [^:]+: torch.minimum at diffusion.py:\d+ \(x0 = torch.maximum\(torch.minimum\(x0, "
                    r"torch.tensor\(\[1.0\]\)\).*\) mixes devices: it gets a CPU tensor of shape \(1,\), made on "
                    r"that line, with tensors on (cuda|mps)", made_inside)
    assert re.search(r"made at diffusion.py:\d+ \(img = self.p_sample\(img, torch.full\(\(b,\), i, "
                     r"dtype=torch.long\), i\)\)", left_on_cpu)


def test_a_file_that_picks_its_device_at_import_fails_no_check(verdicts_by_file):
    """It runs on every device the trainer picks by default; choosing the device itself is a
    PortabilityWarning (tests/test_verdicts.py), not a failure."""
    assert verdicts_by_file["device_chosen_at_import"] == {}


def test_a_file_that_cannot_be_built_on_cuda_fails_there_naming_the_line_in_init(verdicts_by_file):
    """On a CPU torch.cuda.is_available() is False and the line runs on CPU tensors alone: only
    the run as if CUDA were present reaches it."""
    failed = verdicts_by_file["cuda_only_in_init"]
    assert set(failed) == {ON_THE_TRAINERS_DEVICES}
    assert re.match(r"Failed: building the Diffusion on CUDA: torch.cat at diffusion.py:\d+ \(self.alphas_cumprod_prev "
                    r"= torch.cat\(\[torch.tensor\(\[1.0\]\), self.alphas_cumprod\[:-1\]\]\)\) mixes devices: it "
                    r"gets a CPU tensor of shape \(1,\), made on that line, with tensors on cuda", failed[ON_THE_TRAINERS_DEVICES])


def test_a_device_chosen_at_import_from_cuda_alone_fails_on_an_apple_gpu(verdicts_by_file):
    """"cuda" if torch.cuda.is_available() else "cpu": the trainer picks MPS on a Mac, and the
    file's tensors stay on the CPU there."""
    failed = verdicts_by_file["device_chosen_at_import_without_mps"]
    assert set(failed) == WITHOUT_MPS.caught_by
    assert re.match(r"Failed: \w+ on an Apple GPU \(MPS\): torch.\w+ at diffusion.py:\d+ \(.*\) mixes devices: it gets "
                    r"a CPU tensor .*, with tensors on mps", failed["test_runs_on_each_device_the_trainer_picks"])
