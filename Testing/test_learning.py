"""The latent path learns: two annotators disagree on the same image, and the samples must cover both.

One image, two targets (a small and a large disc around the same centre), as two readers would draw.
A deterministic model can at best predict one compromise mask; Probabilistic SAM must learn to place
the two readers in different regions of z. This test fails if the posterior, the KL or the projection
of z into the prompt tokens is broken (the samples then collapse onto one mask).
"""

import numpy as np
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.modeling import preprocess
from Training.learning.loss import LossConfig, probsam_loss
from ProbSAMLib.metrics import ged, sample_diversity


@pytest.fixture(autouse=True)
def two_threads():
    """The 400 optimisation steps run on 2 CPU threads, the setting the assertions were measured at.

    Set here, not at import: other test modules set 1 thread when pytest imports them, and the last
    import wins, so a module-level call made this test's numbers depend on which files were collected.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def two_mode_data(size=128):
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - 64) ** 2 + (xx - 64) ** 2
    image = np.full((size, size), 0.15, np.float32)
    image[r2 < 18 ** 2] = 0.45  # faint halo: the part only one reader includes
    image[r2 < 9 ** 2] = 0.9  # dense core: both readers include it
    readers = np.stack([r2 < 9 ** 2, r2 < 18 ** 2])
    return image, readers


def samples_of(model, embeddings, box, n, seed, mode="sample"):
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        z = model.latents(embeddings, box, n, gen, mode)
        logits = model.decode(embeddings, box, z)
        probs = torch.sigmoid(preprocess.logits_to_image(logits, (128, 128), 128))
    return probs[0].numpy() > 0.5


def test_samples_cover_both_readers():
    torch.manual_seed(0)
    config = ProbSAMConfig.preset("tiny", window=None)
    model = build_probsam(config, seed=0)
    image, readers = two_mode_data()
    box = torch.tensor([[40.0, 40.0, 88.0, 88.0]])  # one box for both readers (their union + margin)
    with torch.no_grad():
        embeddings = model.encode(torch.from_numpy(image)[None])  # frozen encoder: encode once
    targets = preprocess.masks_to_low_res(torch.from_numpy(readers).float(), (128, 128), 128, config.low_res_size)

    untrained = ged(samples_of(model, embeddings, box, 16, seed=1), readers)

    params = [p for p in model.parameters() if p.requires_grad]
    # Why 5e-4 for 400 steps: at 2e-3 for 250 steps the samples collapsed onto one mask in about half of
    # the seeds, and which half depended on the CPU's instruction set (AVX2 vs AVX-512 rounding); at 5e-4
    # for 400 steps seeds 0, 1, 3 and 4 learned on both (best IoU >= 0.98, GED 0.02-0.15 vs 0.39-0.62).
    optimiser = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    loss_cfg = LossConfig(beta=1.0, dice_weight=10.0, anneal_steps=50, free_bits=0.0)
    batch = 8
    rng = np.random.default_rng(0)
    model.train()
    for step in range(400):
        which = torch.from_numpy(rng.integers(0, 2, batch))
        out = model(embeddings.expand(batch, -1, -1, -1), box.expand(batch, 4), targets[which])
        loss = probsam_loss(out, targets[which], step, loss_cfg)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    samples = samples_of(model, embeddings, box, 16, seed=1)
    prior_mean = samples_of(model, embeddings, box, 16, seed=1, mode="mean")
    trained, deterministic = ged(samples, readers), ged(prior_mean, readers)
    print(f"GED untrained {untrained:.3f}, prior-mean {deterministic:.3f}, samples {trained:.3f}, "
          f"diversity {sample_diversity(samples):.3f}")
    # Both readers are reproduced by some sample...
    best_iou = [max(((s & r).sum() / max((s | r).sum(), 1)) for s in samples) for r in readers]
    assert min(best_iou) > 0.7, best_iou
    # ...and the sample set is far closer to the readers' distribution than one deterministic mask.
    assert trained < 0.5 * deterministic
    assert trained < 0.5 * untrained
    assert sample_diversity(samples) > 0.1
