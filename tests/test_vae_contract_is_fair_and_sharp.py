"""The contract (A3_PartA/vae_contract.py) is fair and sharp, shown on known implementations.

Fair: it passes on this package's vae.py and on two correct ones written independently in the
skeleton's style (tests/skeleton_style_vae/): hidden_dim hard-coded or a keyword, an extra
keyword, ``assert input_size == 784``, flattening by nn.Flatten, reshape or torch.flatten,
decoders that end in Unflatten or return (N, 784) for ``forward`` to reshape, eps by
``randn(mu.shape, device=...)`` or ``randn(N, Z).to(mu)``, sigma as sqrt(exp(logvar)) or
exp(logvar) ** 0.5, the loss as (BCE + KL) / N or BCE / N + KL / N.
Sharp: each mutant below is the keyword_hidden_dim file with one known mistake, and the
contract fails it in exactly the tests that check what it gets wrong.

The contract runs once per file, in one subprocess, with $A3_VAE naming the file, exactly as a
student runs it.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from contract_verdicts import Mutant, verdicts

TESTS = Path(__file__).resolve().parent
CONTRACT = TESTS.parent / "A3_PartA" / "vae_contract.py"
STUDENT_STYLE = TESTS / "skeleton_style_vae"
MUTATED = STUDENT_STYLE / "keyword_hidden_dim" / "vae.py"
CORRECT = {"ours": TESTS.parent / "A3_PartA" / "vae.py", "keyword_hidden_dim": MUTATED,
           "reshape_in_forward": STUDENT_STYLE / "reshape_in_forward" / "vae.py"}


def both(test):
    """The test's VAE and CVAE cases."""
    return {f"{test}[VAE]", f"{test}[CVAE]"}


SHAPES = "test_forward_returns_x_hat_n_1_28_28_and_mu_logvar_n_z"
PROBABILITIES = both("test_x_hat_is_one_bernoulli_probability_per_pixel")
SIGNS = both("test_encoder_gives_mu_of_either_sign_and_logvar_below_zero")
ON_ITS_OWN = both("test_encoder_encodes_each_image_on_its_own")
DECODES_Z = "test_forward_decodes_z_drawn_by_reparametrize"
ENCODER_READS_C = "test_cvae_encoder_reads_the_class"
DECODER_READS_C = "test_cvae_decoder_draws_a_different_image_for_each_class_from_one_code"
REPARAMETRIZE = "test_reparametrize_is_mu_plus_sigma_times_one_standard_normal_draw_of_mu_shape"
MOMENTS = "test_reparametrize_draws_with_mean_mu_and_variance_exp_logvar"
GRADIENTS = "test_reparametrize_passes_gradients_to_mu_and_logvar"
BCE = "test_loss_reconstruction_term_is_bce_summed_over_pixels_and_averaged_over_the_batch"
KL = "test_loss_kl_term_is_eq_3_summed_over_latent_dimensions_and_averaged_over_the_batch"
ELBO = "test_loss_function_is_the_negative_elbo_of_eq_4"
GENERATES = "test_decoder_turns_codes_from_the_prior_into_images_that_show_images_draws"
TRAINS = both("test_train_vae_lowers_the_negative_elbo_of_held_out_images")
DRAWS_Z = {REPARAMETRIZE, MOMENTS, GRADIENTS, *both(DECODES_Z)}
CVAE_DECODER = {f"{DECODES_Z}[CVAE]", DECODER_READS_C, f"{GENERATES}[CVAE]"}
KL_LINE = "kl = -0.5 * torch.sum("
LOSS_LINE = "return (bce + kl) / N"
SIGMA_LINE = "sigma = torch.exp(logvar) ** 0.5"
HEAD_LINE = "return nn.Linear(hidden_dim, latent_size)"
CVAE_DECODER_LINE = "pixel_decoder(latent_size + num_classes, hidden_dim, activation)"

MUTANTS = [
    Mutant("kl_sign_flipped", ((KL_LINE, "kl = 0.5 * torch.sum("),),
           {KL, f"{ELBO}[1]", f"{ELBO}[4]"}),
    Mutant("kl_without_the_half", ((KL_LINE, "kl = -torch.sum("),),
           {KL, f"{ELBO}[1]", f"{ELBO}[4]"}),
    Mutant("kl_summed_over_the_batch_not_divided", ((LOSS_LINE, "return bce / N + kl"),),
           {KL, f"{ELBO}[4]"}),
    Mutant("loss_not_divided_by_the_batch", ((LOSS_LINE, "return bce + kl"),),
           {BCE, KL, f"{ELBO}[4]"}),
    Mutant("bce_mean_reduction", (('reduction="sum"', 'reduction="mean"'),),
           {BCE, f"{ELBO}[1]", f"{ELBO}[4]"}),
    Mutant("mse_mean_for_bce", (('F.binary_cross_entropy(x_hat, x, reduction="sum")',
                                 'F.mse_loss(x_hat, x, reduction="mean")'),),
           {BCE, f"{ELBO}[1]", f"{ELBO}[4]"}),
    Mutant("std_used_as_variance", ((SIGMA_LINE, "sigma = torch.exp(logvar)"),), DRAWS_Z),
    Mutant("logvar_used_as_std", ((SIGMA_LINE, "sigma = logvar"),), DRAWS_Z),
    Mutant("eps_of_the_wrong_shape", (("eps = torch.randn(N, Z)", "eps = torch.randn(1, Z)"),), DRAWS_Z),
    Mutant("z_cut_from_the_graph", (("return mu + sigma * eps", "return (mu + sigma * eps).detach()"),),
           {GRADIENTS}),
    Mutant("decoder_given_mu_not_z", (("self.decoder(reparametrize(mu, logvar))", "self.decoder(mu)"),),
           {f"{DECODES_Z}[VAE]"}),
    Mutant("relu_on_the_heads", ((HEAD_LINE, "return nn.Sequential(nn.Linear(hidden_dim, latent_size), nn.ReLU())"),),
           SIGNS),
    Mutant("batchnorm_and_relu_on_the_heads",
           ((HEAD_LINE, "return nn.Sequential(nn.Linear(hidden_dim, latent_size), "
                        "nn.BatchNorm1d(latent_size), nn.ReLU())"),),
           SIGNS | ON_ITS_OWN),
    Mutant("latent_size_ignored_by_the_heads", ((HEAD_LINE, "return nn.Linear(hidden_dim, 15)"),),
           {f"{SHAPES}[VAE-4]", f"{SHAPES}[CVAE-4]"}),
    Mutant("no_sigmoid", (("nn.Sigmoid(), ", ""),),
           PROBABILITIES | both(GENERATES) | TRAINS),
    Mutant("label_not_given_to_the_decoder",
           ((CVAE_DECODER_LINE, "pixel_decoder(latent_size, hidden_dim, activation)"),
            ("self.decoder(torch.cat((z, c), dim=1))", "self.decoder(z)")),
           CVAE_DECODER),
    Mutant("label_given_twice_to_the_decoder",
           ((CVAE_DECODER_LINE, "pixel_decoder(latent_size + 2 * num_classes, hidden_dim, activation)"),
            ("torch.cat((z, c), dim=1)", "torch.cat((z, c, c), dim=1)")),
           CVAE_DECODER),
    Mutant("decoder_reads_c_then_z", (("torch.cat((z, c), dim=1)", "torch.cat((c, z), dim=1)"),),
           {f"{DECODES_Z}[CVAE]"}),
    Mutant("label_not_given_to_the_encoder",
           (("hidden_stack(input_size + num_classes,", "hidden_stack(input_size,"),
            ("torch.cat((torch.flatten(x, start_dim=1), c), dim=1)", "torch.flatten(x, start_dim=1)")),
           {ENCODER_READS_C}),
]


@pytest.fixture(scope="module")
def verdicts_by_file(tmp_path_factory):
    """{implementation name: the contract's failures on it}, from one run over every file."""
    return verdicts(CONTRACT, "A3_VAE", CORRECT, MUTATED, MUTANTS, tmp_path_factory.mktemp("implementations"))


@pytest.mark.parametrize("name", CORRECT)
def test_contract_passes_on_a_correct_vae(verdicts_by_file, name):
    assert verdicts_by_file[name] == {}


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda mutant: mutant.name)
def test_contract_fails_a_mistake_in_the_tests_that_check_it(verdicts_by_file, mutant):
    assert set(verdicts_by_file[mutant.name]) == mutant.caught_by


def test_failure_names_the_equation_and_shows_the_numbers(verdicts_by_file):
    """The KL without its 1/2 is twice eq. (3)."""
    message = verdicts_by_file["kl_without_the_half"][KL]
    assert message.startswith("Failed: eq. (3) KL summed over latent dimensions / N is off in 1 of 1 values. Worst: got ")
    assert "relative error 1 (tolerance 0.0001 relative" in message


def test_heads_with_a_relu_are_told_that_logvar_must_go_below_zero(verdicts_by_file):
    message = verdicts_by_file["relu_on_the_heads"]["test_encoder_gives_mu_of_either_sign_and_logvar_below_zero[VAE]"]
    assert "VAE's encoder gave mu in [0, " in message and "logvar go below 0" in message


def test_a_decoder_that_cannot_read_z_and_c_is_told_the_shapes(verdicts_by_file):
    message = verdicts_by_file["label_given_twice_to_the_decoder"][DECODER_READS_C]
    assert message.startswith("Failed: CVAE's decoder cannot read codes of shape (10, 25)")


AS_ON_A_GPU_MACHINE = """
import sys, pytest, torch
torch.cuda.is_available = lambda: True  # a3_helper.pick_device would now answer CUDA ...
if hasattr(torch, "accelerator"):  # torch 2.6 on: Adam's own check stays off the GPU
    torch.accelerator.is_available = lambda: False
sys.exit(pytest.main([sys.argv[1], "-q", "-p", "no:cacheprovider", "-k", "train_vae"]))
"""


@pytest.mark.slow
def test_the_contract_trains_on_the_cpu_even_where_a_gpu_is_found():
    """On a GPU a file's mistake can trip a CUDA kernel's assert and break the CUDA context of the
    whole process (the notebook's kernel): the contract's training check never goes there. Here
    the machine claims a GPU it does not have, so any move to CUDA would fail the check."""
    run = subprocess.run([sys.executable, "-c", AS_ON_A_GPU_MACHINE, str(CONTRACT)], cwd=TESTS.parent,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
