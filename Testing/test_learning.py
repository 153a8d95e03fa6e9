"""The latent path learns: two annotators disagree on the same image, and the samples must cover both.

One image, two targets (a small and a large disc around the same centre), as two readers would draw.
A deterministic model can at best predict one compromise mask; Probabilistic SAM must learn to place
the two readers in different regions of z. This test fails if the posterior, the KL or the projection
of z into the prompt tokens is broken (the samples then collapse onto one mask).

Kept cheap (a few seconds on one CPU thread): the tiny model at 64 px (an 8 x 8 embedding, a 32 x 32
decoder grid) for 200 steps. Checked when it was made small, on one and two threads: seeds 0-9 all learned
both readers (best IoU >= 0.92, sample GED 0.01-0.16 vs 0.40-0.50 for the prior mean), and with the latent
projection frozen at its zero initialisation (z cannot reach the decoder) seeds 0-4 all failed (no
diversity, best IoU <= 0.35 for one reader).
"""

import numpy as np
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.modeling import preprocess
from Training.learning.loss import LossConfig, probsam_loss
from ProbSAMLib.metrics import ged, sample_diversity

SIZE = 64  # image and model input side (img_size): the tiny model's smallest sensible grid


@pytest.fixture(autouse=True)
def one_thread():
    """The optimisation runs on 1 CPU thread, the setting the assertions were checked at (2 gave the same
    verdicts), whatever other test modules set when pytest imports them, and without oversubscribing
    the cores when pytest-xdist runs two tests at once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def two_mode_data(size=SIZE):
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size // 2) ** 2 + (xx - size // 2) ** 2
    image = np.full((size, size), 0.15, np.float32)
    image[r2 < 12 ** 2] = 0.45  # faint halo: the part only one reader includes
    image[r2 < 6 ** 2] = 0.9  # dense core: both readers include it
    readers = np.stack([r2 < 6 ** 2, r2 < 12 ** 2])
    return image, readers


def samples_of(model, embeddings, box, n, seed, mode="sample"):
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        z = model.latents(embeddings, box, n, gen, mode)
        logits = model.decode(embeddings, box, z)
        probs = torch.sigmoid(preprocess.logits_to_image(logits, (SIZE, SIZE), SIZE))
    return probs[0].numpy() > 0.5


def test_samples_cover_both_readers():
    torch.manual_seed(0)
    config = ProbSAMConfig.preset("tiny", window=None, img_size=SIZE)
    model = build_probsam(config, seed=0)
    image, readers = two_mode_data()
    box = torch.tensor([[14.0, 14.0, 50.0, 50.0]])  # one box for both readers (their union + margin)
    with torch.no_grad():
        embeddings = model.encode(torch.from_numpy(image)[None])  # frozen encoder: encode once
    targets = preprocess.masks_to_low_res(torch.from_numpy(readers).float(), (SIZE, SIZE), SIZE, config.low_res_size)

    untrained = ged(samples_of(model, embeddings, box, 16, seed=1), readers)

    params = [p for p in model.parameters() if p.requires_grad]
    # Every batch holds both readers' masks, half each: with a random reader per row, 200 steps at 1e-3
    # collapsed onto one mask for 1 seed in 10 (the batches' luck); balanced, none did.
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    loss_cfg = LossConfig(beta=1.0, dice_weight=10.0, anneal_steps=50, free_bits=0.0)
    batch = 8
    which = torch.arange(batch) % 2
    model.train()
    for step in range(200):
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
