"""ProbSAM core on the tiny model: shapes, determinism, prior vs posterior, and SAM equivalence."""

import numpy as np
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.modeling import preprocess
from ProbSAMLib.modeling.decoding import decode_masks
from ProbSAMLib.inference.sampling import sample_masks

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    m = build_probsam(ProbSAMConfig.preset("tiny"), seed=0).eval()
    # Give z a visible effect: the projection's last layer starts at zero by design.
    torch.manual_seed(1)
    torch.nn.init.normal_(m.latent_projection.mlp[-1].weight, std=0.5)
    return m


def ct_slice(seed=0, size=128):
    rng = np.random.default_rng(seed)
    img = rng.normal(-800, 60, (size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - 64) ** 2 + (xx - 60) ** 2 < 12 ** 2] = 20.0
    return img


BOX = [44.0, 48.0, 80.0, 82.0]


def test_sample_shapes_and_ranges(model):
    result = sample_masks(model, ct_slice(), BOX, n_samples=5, seed=0)
    assert result.probabilities.shape == (1, 5, 128, 128)
    assert result.masks.dtype == bool and result.masks.shape == (1, 5, 128, 128)
    assert result.z.shape == (1, 5, model.config.latent_dim)
    assert 0.0 <= result.probabilities.min() and result.probabilities.max() <= 1.0


def test_non_square_image_maps_back_to_its_own_size(model):
    img = ct_slice()[:, :96]
    result = sample_masks(model, img, [20, 30, 60, 70], n_samples=2, seed=0)
    assert result.probabilities.shape == (1, 2, 128, 96)


def test_same_seed_is_bit_identical_and_seeds_differ(model):
    a = sample_masks(model, ct_slice(), BOX, n_samples=4, seed=7)
    b = sample_masks(model, ct_slice(), BOX, n_samples=4, seed=7)
    c = sample_masks(model, ct_slice(), BOX, n_samples=4, seed=8)
    assert np.array_equal(a.probabilities, b.probabilities)
    assert not np.allclose(a.probabilities, c.probabilities)
    # within one call, the N samples differ from each other (prior sigma > 0)
    assert not np.allclose(a.probabilities[0, 0], a.probabilities[0, 1])


def test_mean_mode_is_deterministic_and_repeats(model):
    r = sample_masks(model, ct_slice(), BOX, n_samples=3, mode="mean")
    assert np.array_equal(r.probabilities[0, 0], r.probabilities[0, 2])


def test_batch_of_images_equals_one_at_a_time(model):
    imgs = np.stack([ct_slice(0), ct_slice(1)])
    boxes = [BOX, [30, 30, 70, 90]]
    gen_batch = torch.Generator().manual_seed(3)
    batched = sample_masks(model, imgs, boxes, n_samples=3, generator=gen_batch)
    # the same latents, decoded per image, must give the same probabilities
    for i in range(2):
        emb = model.encode(preprocess.window_ct(torch.from_numpy(imgs[i:i + 1]), model.config.window))
        boxes_model = preprocess.boxes_to_model_frame(torch.tensor([boxes[i]]), (128, 128), 128)
        logits = model.decode(emb, boxes_model, torch.from_numpy(batched.z[i:i + 1]))
        probs = torch.sigmoid(preprocess.logits_to_image(logits, (128, 128), 128))
        np.testing.assert_allclose(probs.detach().numpy()[0], batched.probabilities[i], atol=1e-5)


def test_batched_decoder_matches_sams_own_decoder(model):
    """decode_masks (B images x N prompts) must equal SAM's MaskDecoder run image by image."""
    torch.manual_seed(0)
    b, n, c = 3, 4, model.config.prompt_dim
    grid = model.config.embedding_size
    emb = torch.randn(b, c, grid, grid)
    sparse = torch.randn(b, n, 2, c)
    dense = torch.randn(b, 1, c, grid, grid)
    pe = model.sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        ours = decode_masks(model.sam.mask_decoder, emb, pe, sparse, dense)
        for i in range(b):
            sams, _ = model.sam.mask_decoder(emb[i:i + 1], pe, sparse[i], dense[i].expand(n, -1, -1, -1), False)
            torch.testing.assert_close(ours[i], sams[:, 0], rtol=1e-4, atol=1e-4)


def test_untrained_projection_reproduces_sam_box_prediction():
    """With the projection at its zero init, every sample is SAM's own single-mask box prediction."""
    m = build_probsam(ProbSAMConfig.preset("tiny"), seed=0).eval()
    img = torch.from_numpy(preprocess.window_ct(ct_slice(), m.config.window))[None]
    with torch.no_grad():
        emb = m.encode(img)
        box = torch.tensor([BOX])
        ours = m.decode(emb, box, torch.randn(1, 3, m.config.latent_dim))
        # SAM convention: corners are pixel indices of the first and last covered pixel.
        sparse, dense = m.sam.prompt_encoder(points=None, boxes=box - torch.tensor([0, 0, 1.0, 1.0]), masks=None)
        sams, _ = m.sam.mask_decoder(emb, m.sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    for k in range(3):
        torch.testing.assert_close(ours[0, k], sams[0, 0], rtol=1e-4, atol=1e-4)


def test_training_uses_posterior_and_inference_uses_prior(model):
    img = torch.from_numpy(preprocess.window_ct(ct_slice(), model.config.window))[None]
    box = torch.tensor([BOX])
    small = torch.zeros(1, 128, 128)
    small[0, 58:70, 54:66] = 1
    large = torch.zeros(1, 128, 128)
    large[0, 50:78, 46:74] = 1
    to_low = lambda m: preprocess.masks_to_low_res(m, (128, 128), 128, model.config.low_res_size)
    with torch.no_grad():
        emb = model.encode(img)
        torch.manual_seed(0)
        post_small = model.posterior_distribution(emb, box, to_low(small)).base_dist.loc
        post_large = model.posterior_distribution(emb, box, to_low(large)).base_dist.loc
        prior_mean = model.latents(emb, box, 2, mode="mean")
        # the posterior depends on the target mask; the prior has no mask input at all
        assert not torch.allclose(post_small, post_large)
        torch.manual_seed(5)
        out = model(emb, box, to_low(small), n_samples=2)
        assert out.logits.shape == (1, 2, model.config.low_res_size, model.config.low_res_size)
        # perturbing the posterior changes nothing at inference; perturbing the prior does
        before = sample_masks(model, ct_slice(), BOX, n_samples=3, seed=1).probabilities
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.posterior.head.bias.add_(3.0)
        assert np.array_equal(before, sample_masks(model, ct_slice(), BOX, n_samples=3, seed=1).probabilities)
        model.prior.head.bias.add_(3.0)
        assert not np.allclose(before, sample_masks(model, ct_slice(), BOX, n_samples=3, seed=1).probabilities)
        model.load_state_dict(saved)
    assert torch.equal(prior_mean[0, 0], prior_mean[0, 1])


def test_frozen_encoder_gets_no_gradient(model):
    assert not any(p.requires_grad for p in model.sam.image_encoder.parameters())
    assert all(p.requires_grad for p in model.prior.parameters())


@pytest.mark.parametrize("bad_box, message", [
    ([50, 50, 40, 80], "x2 > x1"),
    ([200, 200, 240, 240], "outside"),
])
def test_bad_boxes_are_rejected(model, bad_box, message):
    with pytest.raises(ValueError, match=message):
        sample_masks(model, ct_slice(), bad_box, n_samples=2, seed=0)


def test_non_finite_image_is_rejected(model):
    img = ct_slice()
    img[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sample_masks(model, img, BOX, n_samples=2, seed=0)


def test_latents_mode_must_be_sample_or_mean(model):
    """ProbSAM.latents refuses a mode other than "sample" or "mean" (a typo must not silently sample)."""
    img = torch.from_numpy(preprocess.window_ct(ct_slice(), model.config.window))[None]
    with torch.no_grad():
        emb = model.encode(img)
        with pytest.raises(ValueError, match="mode must be 'sample' or 'mean', got 'average'"):
            model.latents(emb, torch.tensor([BOX]), 2, mode="average")


def test_reading_neighbour_slices_twice_changes_nothing():
    """read_neighbour_slices is a one-time conversion of the patch embedding: a second call leaves the
    weights and the config as the first call made them."""
    m = build_probsam(ProbSAMConfig.preset("tiny"), seed=0)
    m.read_neighbour_slices()
    once = {k: v.clone() for k, v in m.sam.image_encoder.patch_embed.state_dict().items()}
    assert m.config.neighbour_slices
    m.read_neighbour_slices()
    for key, value in m.sam.image_encoder.patch_embed.state_dict().items():
        assert torch.equal(value, once[key]), key
    assert m.config.neighbour_slices


def test_latent_to_dense_moves_the_dense_embedding_with_z():
    """With config.latent_to_dense, z also shifts SAM's dense prompt embedding: with the token part of the
    projection at zero, different z still give different masks, and with the dense part at zero as well
    every z gives SAM's own prediction again."""
    m = build_probsam(ProbSAMConfig.preset("tiny", latent_to_dense=True), seed=0).eval()
    last = m.latent_projection.mlp[-1]
    dim = m.config.prompt_dim
    assert last.out_features == 3 * dim  # two box tokens and the dense embedding
    img = torch.from_numpy(preprocess.window_ct(ct_slice(), m.config.window))[None]
    box = torch.tensor([BOX])
    z = torch.randn(1, 2, m.config.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = m.encode(img)
        torch.nn.init.normal_(last.weight[2 * dim:], std=0.5)  # the dense part only
        logits = m.decode(emb, box, z)
        assert not torch.allclose(logits[0, 0], logits[0, 1])
        last.weight.zero_()
        plain = m.decode(emb, box, z)
        torch.testing.assert_close(plain[0, 0], plain[0, 1])


def test_preprocessing_refuses_images_of_the_wrong_shape():
    """centre_slice and the resizing for the refiner name the shape they got instead of failing later."""
    with pytest.raises(ValueError, match=r"expected images shaped \(B, H, W\), or \(B, 3, H, W\).*\(2, 4, 8, 8\)"):
        preprocess.centre_slice(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"got \(8, 8\)"):
        preprocess.centre_slice(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"expected images shaped \(B, H, W\) or \(B, C, H, W\), got \(8, 8\)"):
        preprocess.images_to_model_frame(torch.zeros(8, 8), 16)
    stack = torch.rand(2, 3, 8, 8)
    assert torch.equal(preprocess.centre_slice(stack), stack[:, 1])


def test_window_none_keeps_unit_images_and_clips_both_types():
    """window None: the image is already in [0, 1]; values outside are clipped, for numpy and torch alike."""
    values = np.array([-0.5, 0.0, 0.25, 1.0, 1.5], np.float32)
    np.testing.assert_array_equal(preprocess.window_ct(values, None), [0.0, 0.0, 0.25, 1.0, 1.0])
    assert torch.equal(preprocess.window_ct(torch.from_numpy(values), None),
                       torch.tensor([0.0, 0.0, 0.25, 1.0, 1.0]))
