"""FID during training: clean-fid features (injected extractor), cached reference statistics."""
import csv

import numpy as np
import pytest
import torch
from cleanfid import fid as clean_fid
from PIL import Image
from scipy import linalg

import fid_score
import images
from afhq_data import make_afhq_folder, part_b_environment  # noqa: F401 (autouse fixture)
from fid_score import frechet_distance, psd_sqrt
from utils import setup_diffusion

NUM_FID_SAMPLES = 24
pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


@pytest.fixture(scope="module")
def afhq(tmp_path_factory):
    return make_afhq_folder(tmp_path_factory.mktemp("afhq"), per_class=6, size=64)


class CountingExtractor:
    """Per-channel mean and spread of the 299x299 images clean-fid feeds it; counts images."""

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1) / 255


def fid_trainer(afhq, results, extractor, data_class="cat", **options):
    _, _, trainer = setup_diffusion(
        train_steps=4, save_and_sample_every=2, fid=True, save_folder=results, data_path=afhq,
        unet_dim_mults=[1, 2], image_size=16, batch_size=4, data_class=data_class,
        time_steps=10, unet_dim=8, dataloader_workers=0, fid_feature_extractor=extractor,
        num_fid_samples=NUM_FID_SAMPLES, num_samples=4, log_every=1, **options)
    return trainer


def generated_images(count=NUM_FID_SAMPLES):
    torch.manual_seed(1)
    return torch.randint(0, 256, (count, 3, 16, 16), dtype=torch.uint8)


def test_reference_statistics_are_computed_once_across_evaluations(afhq, tmp_path):
    extractor = CountingExtractor()
    scorer = fid_trainer(afhq, tmp_path, extractor).fid_scorer
    reference_count = len(scorer.reference_images)
    scorer.score(generated_images())
    scorer.score(generated_images())
    assert extractor.images_seen == reference_count + 2 * NUM_FID_SAMPLES


def test_reference_statistics_are_reused_by_a_later_trainer(afhq, tmp_path):
    fid_trainer(afhq, tmp_path, CountingExtractor()).fid_scorer.score(generated_images())
    extractor = CountingExtractor()
    fid_trainer(afhq, tmp_path, extractor).fid_scorer.score(generated_images())
    assert extractor.images_seen == NUM_FID_SAMPLES


def test_fid_of_the_training_images_against_themselves_is_zero(afhq, tmp_path):
    scorer = fid_trainer(afhq, tmp_path, CountingExtractor(), data_class="all").fid_scorer
    assert scorer.score(scorer.reference_images) == pytest.approx(0, abs=1e-6)


def test_fid_grows_as_the_samples_move_away_from_the_training_images(afhq, tmp_path):
    scorer = fid_trainer(afhq, tmp_path, CountingExtractor(), data_class="all").fid_scorer
    reference = scorer.reference_images
    nearly = (reference.int() + torch.randint(-8, 9, reference.shape, generator=torch.Generator()
                                              .manual_seed(0))).clamp(0, 255).to(torch.uint8)
    assert scorer.score(generated_images()) > 10 * scorer.score(nearly) > 0


def test_an_evaluation_scores_exactly_its_samples(afhq, tmp_path):
    extractor = CountingExtractor()
    scorer = fid_trainer(afhq, tmp_path, extractor).fid_scorer
    scorer.reference_statistics()
    seen_before = extractor.images_seen
    scorer.score(generated_images())
    assert extractor.images_seen - seen_before == NUM_FID_SAMPLES


def pixel_probe(images):
    """Features that see the resize: 21 pixels of each image as clean-fid resized it."""
    return images[:, :, 150, 20:280:40].flatten(1)


def clean_fid_from_png_files(reference, samples, folder):
    """clean-fid's own FID of two uint8 image sets: PNG files, its folder features, its
    distance."""
    statistics = []
    for name, image_set in (("reference", reference), ("samples", samples)):
        (folder / name).mkdir()
        for index, image in enumerate(image_set):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name / f"{index}.png")
        features = clean_fid.get_folder_features(
            str(folder / name), pixel_probe, num_workers=0, device=torch.device("cpu"),
            mode="clean", verbose=False)
        statistics += [features.mean(axis=0), np.cov(features, rowvar=False)]
    return clean_fid.frechet_distance(*statistics)


def test_fid_from_memory_equals_clean_fids_own_from_png_files(tmp_path):
    generator = torch.Generator().manual_seed(3)
    reference = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=generator)
    samples = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=generator)
    scorer = fid_score.FidScorer(reference, tmp_path / "reference.npz", torch.device("cpu"),
                                 pixel_probe)
    expected = clean_fid_from_png_files(reference, samples, tmp_path)
    assert scorer.score(samples) == pytest.approx(expected, rel=1e-3)


class BranchesThenPooling(torch.nn.Module):
    """clean-fid's Inception in small: each branch made contiguous before the concatenation,
    then a 3x3 average pooling; records whether the pooling read channels-last memory."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.branches = torch.nn.ModuleList(torch.nn.Conv2d(3, 4, 3, padding=1) for _ in range(2))
        self.pooled_channels_last = []

    def forward(self, images):
        x = torch.cat([branch(images / 255).contiguous() for branch in self.branches], dim=1)
        self.pooled_channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        pooled = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        small = torch.nn.functional.adaptive_avg_pool2d(pooled, 4)  # then viewed as code may view it
        return torch.cat([small.contiguous().view(len(small), -1), small.flatten(1)], dim=1)


@pytest.mark.parametrize("caller_grad_mode", [torch.enable_grad, torch.inference_mode])
def test_the_inception_runs_channels_last_throughout_on_the_cpu_with_the_same_features(
        tmp_path, caller_grad_mode):
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(6))
    extractor = BranchesThenPooling()
    scorer = fid_score.FidScorer(images, tmp_path / "reference.npz", torch.device("cpu"),
                                 extractor)
    with caller_grad_mode():  # in inference mode, contiguous() reaches the mode whole
        features = scorer.features(images, "features")
    with torch.no_grad():  # outside the scorer: channels-first after the concatenation
        expected = torch.cat([extractor(fid_score.clean_resized(batch))
                              for batch in images.split(fid_score.FID_BATCH)]).numpy()
    assert extractor.pooled_channels_last == [True, True, False, False]
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_the_resize_is_clean_fids_own_on_the_same_image():
    image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(4))
    resized = fid_score.clean_resized(image)[0]
    expected = fid_score.build_resizer("clean")(image[0].permute(1, 2, 0).numpy())
    assert np.array_equal(resized.permute(1, 2, 0).numpy(), expected)
    assert resized.shape == (3, 299, 299) and resized.dtype == torch.float32


def test_fid_of_a_given_image_set_compares_with_that_set_not_the_folder(afhq, tmp_path):
    samples = generated_images()
    given = images.ImageSet(train=torch.zeros(len(samples), 3, 17, 17, dtype=torch.uint8),
                                    reference=samples, key="given")
    scorer = fid_trainer(afhq, tmp_path, CountingExtractor(), image_set=given).fid_scorer
    assert scorer.score(samples) == pytest.approx(0, abs=1e-6)


def test_training_with_fid_on_all_classes_logs_scores_and_plots(afhq, tmp_path):
    trainer = fid_trainer(afhq, tmp_path, CountingExtractor(), data_class="all")
    trainer.train()
    with open(tmp_path / "metrics.csv", newline="") as file:
        scored = [row["step"] for row in csv.DictReader(file) if row["fid"]]
    assert scored == ["2", "4"]
    assert (tmp_path / "fid.png").read_bytes().startswith(b"\x89PNG")


def test_clean_fid_gets_the_trainer_device_and_no_data_parallel(afhq, tmp_path, monkeypatch):
    built, devices = [], []

    def build(mode, device, use_dataparallel):
        built.append((mode, device, use_dataparallel))
        return CountingExtractor()

    get_batch_features = fid_score.get_batch_features

    def recording_features(batch, model, device):
        devices.append(device)
        return get_batch_features(batch, model, device)

    monkeypatch.setattr(fid_score, "build_feature_extractor", build)
    monkeypatch.setattr(fid_score, "get_batch_features", recording_features)
    fid_trainer(afhq, tmp_path, None).fid_scorer.score(generated_images())
    assert built == [("clean", torch.device("cpu"), False)]
    assert devices and set(devices) == {torch.device("cpu")}


def test_frechet_distance_matches_the_matrix_square_root_definition():
    rng = np.random.default_rng(0)
    features_1, features_2 = rng.normal(size=(40, 5)), rng.normal(1.0, 2.0, size=(60, 5))
    mu_1, sigma_1 = features_1.mean(0), np.cov(features_1, rowvar=False)
    mu_2, sigma_2 = features_2.mean(0), np.cov(features_2, rowvar=False)
    expected = (((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1) + np.trace(sigma_2)
                - 2 * np.trace(linalg.sqrtm(sigma_1 @ sigma_2)).real)
    distance = frechet_distance(mu_1, sigma_1, mu_2, sigma_2, psd_sqrt(sigma_2))
    assert distance == pytest.approx(expected)
