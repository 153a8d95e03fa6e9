"""Run SAM's mask decoder on B images x N prompt sets in one pass.

segment_anything's MaskDecoder.predict_masks assumes ONE image with many prompts: it repeats the image
embedding once per prompt set (`repeat_interleave(image_embeddings, n_prompts)`). Given B images and B*N
prompt sets, that makes (B*N)*B copies. `decode_masks_reference` repeats each image embedding exactly N
times and runs the decoder's own submodules (transformer, upscaling, hypernetwork MLPs) unchanged: the
weights and the maths are SAM's.

`decode_masks` (the fast path, used whenever gradients are off) computes the same logits with the same
weights, reordered so that N samples of one image cost far less than N decoder runs:

* Everything the N samples share is computed once per image. In the first two-way block the image tokens
  are the same for every sample (the latent only moves the prompt tokens, unless it also shifts the dense
  embedding): the key/value projections of the token->image attention and the query projection of the
  image->token attention are computed once and broadcast.
* The prompt side has only T = 7 tokens (IoU token, 4 mask tokens, 2 box corners), so every attention
  between the 4096 image tokens and the tokens has rank <= 8 heads x T. The large (4096 x 256) x (256 x 128)
  projections of per-sample image tokens are folded into the small token side: for token->image,
  softmax(q W_k (K+P)^T) (K W_v^T) = softmax((q W_k) (K+P)^T) K W_v^T (the key bias only adds a constant per
  row, which softmax ignores); for image->token, (K+P) W_q^T k^T = (K+P) (W_q^T k^T) and
  Σ_h A_h (v_h W_o,h^T) replaces out_proj(concat_h A_h v_h). One (4096 x 256) x (256 x 56) product per
  sample instead of one (4096 x 256) x (256 x 128) per projection.
* The last token->image attention only feeds the single-mask token (SAM's token 0 of the mask tokens), so
  only that query is computed there.
* `crop`: the output upscaling (two 2x2/stride-2 transposed convolutions, a per-pixel LayerNorm and GELUs)
  and the hypernetwork product are pixel-local on the embedding grid, so running them on a window of grid
  cells gives exactly that window of the full output. Callers that only need the logits around a box pass
  the window (see `box_crop`). The upscaling runs channels-last (oneDNN's fast layout on CPU).

The two paths agree to float rounding (tests: Testing/test_decoding_fast.py; < 1e-5 abs on LiteMedSAM's
logits). The fast path is deterministic for fixed shapes, like the reference.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock

Crop = Tuple[int, int, int, int]  # (row0, row1, col0, col1) on the embedding grid, half-open


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompts: torch.Tensor,
    dense_prompts: torch.Tensor,
    *,
    crop: Optional[Sequence[int]] = None,
    outside: Optional[float] = None,
    fast: Optional[bool] = None,
) -> torch.Tensor:
    """Single-mask logits for B images with N prompt sets each.

    Arguments:
      image_embeddings: (B, C, h, w) from the image encoder.
      image_pe: (1, C, h, w) dense positional encoding (PromptEncoder.get_dense_pe()).
      sparse_prompts: (B, N, T, C) prompt tokens per image and sample.
      dense_prompts: (B, N, C, h, w) or (B, 1, C, h, w) dense prompt embeddings.
      crop: None, or (r0, r1, c0, c1) embedding-grid cells (half-open; `box_crop` makes one): only the
        logits of mask pixels [4*r0, 4*r1) x [4*c0, 4*c1) are computed (4 = the upscaling factor).
      outside: with a crop, None returns just the window (B, N, 4*(r1-r0), 4*(c1-c0)) whose top-left pixel
        is (4*r0, 4*c0) of the full mask; a number returns the full (B, N, 4h, 4w) with that value outside
        the window (e.g. -1e4: probability 0 after a sigmoid).
      fast: True = the fast path, False = `decode_masks_reference`; None (default) = fast unless gradients
        are enabled (training keeps SAM's own module calls).

    Returns:
      (B, N, 4h, 4w) mask logits (SAM's single-mask output, token 0), or the crop as above.
    """
    if fast is None:
        fast = not torch.is_grad_enabled()
    run = _decode_fast if fast else _decode_reference
    h, w = image_embeddings.shape[-2:]
    window = _check_crop(crop, h, w)
    logits = run(decoder, image_embeddings, image_pe, sparse_prompts, dense_prompts, window)
    if window is None or outside is None:
        return logits
    r0, r1, c0, c1 = window
    b, n, hh, ww = logits.shape
    scale_h, scale_w = hh // (r1 - r0), ww // (c1 - c0)
    full = logits.new_full((b, n, h * scale_h, w * scale_w), float(outside))
    full[..., r0 * scale_h:r1 * scale_h, c0 * scale_w:c1 * scale_w] = logits
    return full


def decode_masks_reference(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompts: torch.Tensor,
    dense_prompts: torch.Tensor,
    *,
    crop: Optional[Sequence[int]] = None,
    outside: Optional[float] = None,
) -> torch.Tensor:
    """The plain path: SAM's decoder modules called as SAM calls them (the fast path's yardstick)."""
    return decode_masks(decoder, image_embeddings, image_pe, sparse_prompts, dense_prompts, crop=crop,
                        outside=outside, fast=False)


def box_crop(boxes: torch.Tensor, embedding_hw: Sequence[int], img_size: int, margin: int = 2) -> Crop:
    """The embedding-grid window (r0, r1, c0, c1) covering every box of `boxes` (..., 4) plus `margin` cells.

    boxes: (x1, y1, x2, y2) in the model frame (continuous edges, pixels of the img_size square), e.g.
    preprocess.boxes_to_model_frame(...). One window for the whole batch (the union of the boxes). A margin
    of >= 1 cell keeps bilinear resizing of the logits exact inside the box.
    """
    h, w = int(embedding_hw[0]), int(embedding_hw[1])
    b = boxes.detach().reshape(-1, 4).float().cpu()
    x1, y1 = b[:, 0].min().item(), b[:, 1].min().item()
    x2, y2 = b[:, 2].max().item(), b[:, 3].max().item()
    r0 = max(0, math.floor(y1 * h / img_size) - margin)
    r1 = min(h, math.ceil(y2 * h / img_size) + margin)
    c0 = max(0, math.floor(x1 * w / img_size) - margin)
    c1 = min(w, math.ceil(x2 * w / img_size) + margin)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"the boxes {b.tolist()} do not overlap the {img_size}² model frame")
    return r0, r1, c0, c1


def _check_crop(crop, h: int, w: int) -> Optional[Crop]:
    if crop is None:
        return None
    r0, r1, c0, c1 = (int(v) for v in crop)
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise ValueError(f"crop (r0, r1, c0, c1) = {tuple(crop)} is not a window of the {h}x{w} embedding grid")
    return r0, r1, c0, c1


def _prepare(decoder: MaskDecoder, image_embeddings, sparse_prompts):
    b, n = sparse_prompts.shape[:2]
    if image_embeddings.shape[0] != b:
        raise ValueError(f"{image_embeddings.shape[0]} image embeddings but prompts for {b} images")
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b * n, -1, -1)
    prompts = sparse_prompts.reshape(b * n, sparse_prompts.shape[2], -1).to(output_tokens.dtype)
    return b, n, torch.cat((output_tokens, prompts), dim=1)


def _upscale_and_project(decoder: MaskDecoder, src_bhwc: torch.Tensor, mask_token_out: torch.Tensor,
                         window: Optional[Crop], channels_last: bool = False) -> torch.Tensor:
    """src (BN, h, w, C) image tokens, mask token (BN, C) -> logits (BN, 4h', 4w') of the window.

    channels_last (the fast path): the transposed convolutions run on channels-last tensors (oneDNN's fast
    layout on CPU, about half the time) and the hypernetwork product reads that layout without a copy."""
    if window is not None:
        r0, r1, c0, c1 = window
        src_bhwc = src_bhwc[:, r0:r1, c0:c1]
    bn = src_bhwc.shape[0]
    hyper_in = decoder.output_hypernetworks_mlps[0](mask_token_out)  # (BN, C/8)
    if channels_last:
        src = src_bhwc.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        upscaled = decoder.output_upscaling(src).permute(0, 2, 3, 1)  # (BN, H, W, C/8)
        _, h_up, w_up, c_up = upscaled.shape
        logits = torch.bmm(upscaled.reshape(bn, h_up * w_up, c_up), hyper_in.unsqueeze(2))
        return logits.reshape(bn, h_up, w_up)
    src = src_bhwc.permute(0, 3, 1, 2).contiguous()
    upscaled = decoder.output_upscaling(src)
    _, c_up, h_up, w_up = upscaled.shape
    logits = torch.bmm(hyper_in.unsqueeze(1), upscaled.reshape(bn, c_up, h_up * w_up))
    return logits.reshape(bn, h_up, w_up)


def _decode_reference(decoder, image_embeddings, image_pe, sparse_prompts, dense_prompts, window):
    b, n, tokens = _prepare(decoder, image_embeddings, sparse_prompts)

    # Each image embedding once per sample of that image (not once per prompt set of the whole batch).
    src = image_embeddings.unsqueeze(1) + dense_prompts  # (B, N or 1, C, h, w)
    src = src.expand(b, n, *src.shape[2:]).reshape(b * n, *src.shape[2:])
    pos_src = image_pe.expand(b * n, -1, -1, -1)
    _, c, h, w = src.shape

    hs, src = decoder.transformer(src, pos_src, tokens)
    mask_token_out = hs[:, 1, :]  # token 0 of the mask tokens = SAM's single-mask output

    logits = _upscale_and_project(decoder, src.reshape(b * n, h, w, c), mask_token_out, window)
    return logits.reshape(b, n, *logits.shape[-2:])


# ---- the fast path -------------------------------------------------------------------------------------
def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, D) -> (..., heads, L, D/heads)."""
    *lead, length, dim = x.shape
    return x.reshape(*lead, length, heads, dim // heads).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, d) -> (..., L, heads*d)."""
    *lead, heads, length, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, length, heads * d)


def _per_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection weight (heads*d, C) -> (heads, d, C)."""
    return weight.reshape(heads, weight.shape[0] // heads, weight.shape[1])


def _tokens_to_image(attn: Attention, q_in: torch.Tensor, image_pe_added: Optional[torch.Tensor],
                     image: torch.Tensor, pe: Optional[torch.Tensor] = None) -> torch.Tensor:
    """attn(q=q_in, k=image + pe, v=image) for per-sample image tokens, via the token side.

    q_in (BN, T, C); image (BN, HW, C); image_pe_added = image + pe (BN, HW, C), or None with pe (HW, C)
    given: then (q W_k) (K+P)^T is formed as (q W_k) K^T + (q W_k) P^T (one shared GEMM for P, no K+P pass).
    Returns (BN, T, C), out_proj applied.
    """
    heads = attn.num_heads
    bn, t, _ = q_in.shape
    q = _split_heads(attn.q_proj(q_in), heads)  # (BN, H, T, d)
    d = q.shape[-1]
    # q_h k_h^T = (q_h W_k,h) (K+P)^T + q_h·b_k,h; the last term is constant along the keys: softmax drops it.
    q_folded = torch.matmul(q * (1.0 / math.sqrt(d)), _per_head(attn.k_proj.weight, heads))  # (BN, H, T, C)
    q_folded = q_folded.reshape(bn, heads * t, -1)
    if image_pe_added is not None:
        scores = torch.bmm(q_folded, image_pe_added.transpose(1, 2))  # (BN, H*T, HW)
    else:
        pe_part = torch.matmul(q_folded.reshape(bn * heads * t, -1), pe.transpose(0, 1))
        scores = torch.baddbmm(pe_part.reshape(bn, heads * t, -1), q_folded, image.transpose(1, 2))
    probs = torch.softmax(scores, dim=-1)
    pooled = torch.bmm(probs, image).reshape(bn, heads, t, -1)  # (BN, H, T, C); rows of probs sum to 1:
    out = torch.matmul(pooled, _per_head(attn.v_proj.weight, heads).transpose(1, 2))  # (A K) W_v^T
    out = out + _split_heads(attn.v_proj.bias.reshape(1, 1, -1), heads)  # + b_v
    return attn.out_proj(_merge_heads(out))


def _image_to_tokens_update(block: TwoWayAttentionBlock, keys: torch.Tensor, scores_fn, queries: torch.Tensor,
                            query_pe: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """norm4(keys + attn(q=keys+pe, k=queries+query_pe, v=queries)): (BN, HW, C).

    scores_fn(k_heads (B, N, H, T, d)) -> (BN, H, T, HW) scaled attention scores, shared or per sample.
    keys: (B, 1 or N, HW, C).
    """
    attn = block.cross_attn_image_to_token
    heads = attn.num_heads
    bn, t, _ = queries.shape
    k = _split_heads(attn.k_proj(queries + query_pe), heads).reshape(b, n, heads, t, -1)
    v = _split_heads(attn.v_proj(queries), heads)  # (BN, H, T, d)
    probs = torch.softmax(scores_fn(k), dim=2)  # over the T tokens of each head; (BN, H, T, HW)
    hw = probs.shape[-1]
    # out_proj(concat_h A_h v_h) + b_o = Σ_h A_h (v_h W_o,h^T + b_o/H) (each head's A_h rows sum to 1):
    # one (HW x H*T) x (H*T x C) product, added to the keys in the same call.
    w_out = attn.out_proj.weight.reshape(attn.out_proj.weight.shape[0], heads, -1).permute(1, 2, 0)  # (H, d, C)
    v_out = torch.matmul(v, w_out) + attn.out_proj.bias / heads  # (BN, H, T, C)
    residual = keys.reshape(b * keys.shape[1], hw, -1)
    if keys.shape[1] != n:
        residual = residual.repeat_interleave(n, dim=0) if b > 1 else residual.expand(bn, -1, -1)
    updated = torch.baddbmm(residual, probs.reshape(bn, heads * t, hw).transpose(1, 2),
                            v_out.reshape(bn, heads * t, -1))
    return block.norm4(updated)


def _decode_fast(decoder, image_embeddings, image_pe, sparse_prompts, dense_prompts, window):
    b, n, tokens = _prepare(decoder, image_embeddings, sparse_prompts)
    transformer = decoder.transformer
    _, c, h, w = image_embeddings.shape
    hw = h * w
    bn = b * n
    # Image tokens (B, N or 1, HW, C): shared by all samples unless the dense prompt varies per sample.
    src = image_embeddings.unsqueeze(1) + dense_prompts
    shared = src.shape[1] == 1 and n > 1
    if not shared:
        src = src.expand(b, n, *src.shape[2:])
    keys = src.flatten(3).transpose(2, 3)  # (B, N or 1, HW, C), channels last (a view)
    pe = image_pe.flatten(2).transpose(1, 2).to(keys.dtype)  # (1, HW, C)
    query_pe = tokens
    queries = tokens

    for index, block in enumerate(transformer.layers):
        # Self attention of the tokens (small).
        if block.skip_first_layer_pe:
            queries = block.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + block.self_attn(q=q, k=q, v=queries)
        queries = block.norm1(queries)

        keys_pe = keys + pe.unsqueeze(0)  # (B, N or 1, HW, C)
        t_attn = block.cross_attn_token_to_image
        if shared and index == 0:
            # Token -> image with the image side computed once per image (SAM's own order of operations).
            heads = t_attn.num_heads
            q = _split_heads(t_attn.q_proj(queries + query_pe), heads)  # (BN, H, T, d)
            t, d = q.shape[-2], q.shape[-1]
            q = q.reshape(b, n, heads, t, d).permute(0, 2, 1, 3, 4).reshape(b, heads, n * t, d)
            k = _split_heads(t_attn.k_proj(keys_pe[:, 0]), heads)  # (B, H, HW, d)
            v = _split_heads(t_attn.v_proj(keys[:, 0]), heads)
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)  # (B, H, N*T, HW)
            out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, N*T, d)
            out = out.reshape(b, heads, n, t, d).permute(0, 2, 1, 3, 4).reshape(bn, heads, t, d)
            attn_out = t_attn.out_proj(_merge_heads(out))
        else:
            attn_out = _tokens_to_image(t_attn, queries + query_pe, keys_pe.reshape(bn, hw, c),
                                        keys.reshape(bn, hw, c))
        queries = block.norm2(queries + attn_out)
        queries = block.norm3(queries + block.mlp(queries))

        i_attn = block.cross_attn_image_to_token
        heads = i_attn.num_heads
        if shared and index == 0:
            q_img = _split_heads(i_attn.q_proj(keys_pe[:, 0]), heads)  # (B, H, HW, d), once per image
            d = q_img.shape[-1]

            def scores_fn(k_heads, q_img=q_img, d=d):
                _, _, _, t, _ = k_heads.shape
                k_all = k_heads.transpose(1, 2).reshape(b, heads, n * t, d)  # (B, H, N*T, d)
                s = torch.matmul(k_all * (1.0 / math.sqrt(d)), q_img.transpose(-1, -2))  # (B, H, N*T, HW)
                return s.reshape(b, heads, n, t, hw).transpose(1, 2).reshape(bn, heads, t, hw)
        else:
            image_in = keys_pe.reshape(bn, hw, c)
            w_q = _per_head(i_attn.q_proj.weight, heads)  # (H, d, C)
            b_q = i_attn.q_proj.bias.reshape(heads, 1, -1)  # (H, 1, d)

            def scores_fn(k_heads, image_in=image_in, w_q=w_q, b_q=b_q):
                _, _, _, t, d = k_heads.shape
                k_scaled = k_heads.reshape(bn, heads, t, d) * (1.0 / math.sqrt(d))
                # (K+P) W_q,h^T k_h^T + b_q,h k_h^T: fold W_q into the tokens (H*T x C per sample).
                folded = torch.matmul(k_scaled, w_q).reshape(bn, heads * t, c)  # (BN, H*T, C)
                bias = torch.matmul(k_scaled, b_q.transpose(1, 2)).reshape(bn, heads * t, 1)
                s = torch.baddbmm(bias, folded, image_in.transpose(1, 2))  # (BN, H*T, HW)
                return s.reshape(bn, heads, t, hw)
        keys = _image_to_tokens_update(block, keys, scores_fn, queries, query_pe, b, n).reshape(b, n, hw, c)
        shared = False

    # Final token -> image attention: only the single-mask token (index 1) is used downstream.
    keys_flat = keys.reshape(bn, hw, c)
    q_in = (queries + query_pe)[:, 1:2]
    attn_out = _tokens_to_image(transformer.final_attn_token_to_image, q_in, None, keys_flat, pe[0])
    mask_token_out = transformer.norm_final_attn(queries[:, 1:2] + attn_out)[:, 0]

    logits = _upscale_and_project(decoder, keys_flat.reshape(bn, h, w, c), mask_token_out, window,
                                  channels_last=True)
    return logits.reshape(b, n, *logits.shape[-2:])
