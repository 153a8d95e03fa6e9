"""Run SAM's mask decoder on B images x N prompt sets in one pass.

segment_anything's MaskDecoder.predict_masks assumes ONE image with many prompts: it repeats the image
embedding once per prompt set (`repeat_interleave(image_embeddings, n_prompts)`). Given B images and B*N
prompt sets, that makes (B*N)*B copies. Here each image embedding is repeated exactly N times, then the
decoder's own submodules (transformer, upscaling, hypernetwork MLPs) run unchanged, so the weights and the
maths are SAM's.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompts: torch.Tensor,
    dense_prompts: torch.Tensor,
) -> torch.Tensor:
    """Single-mask logits for B images with N prompt sets each.

    Arguments:
      image_embeddings: (B, C, h, w) from the image encoder.
      image_pe: (1, C, h, w) dense positional encoding (PromptEncoder.get_dense_pe()).
      sparse_prompts: (B, N, T, C) prompt tokens per image and sample.
      dense_prompts: (B, N, C, h, w) or (B, 1, C, h, w) dense prompt embeddings.

    Returns:
      (B, N, 4h, 4w) mask logits (SAM's single-mask output, token 0).
    """
    b, n = sparse_prompts.shape[:2]
    if image_embeddings.shape[0] != b:
        raise ValueError(f"{image_embeddings.shape[0]} image embeddings but prompts for {b} images")
    tokens_per_set = sparse_prompts.shape[2]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b * n, -1, -1)
    prompts = sparse_prompts.reshape(b * n, tokens_per_set, -1).to(output_tokens.dtype)
    tokens = torch.cat((output_tokens, prompts), dim=1)

    # Each image embedding once per sample of that image (not once per prompt set of the whole batch).
    src = image_embeddings.unsqueeze(1) + dense_prompts  # (B, N or 1, C, h, w)
    src = src.expand(b, n, *src.shape[2:]).reshape(b * n, *src.shape[2:])
    pos_src = image_pe.expand(b * n, -1, -1, -1)
    _, c, h, w = src.shape

    hs, src = decoder.transformer(src, pos_src, tokens)
    mask_token_out = hs[:, 1, :]  # token 0 of the mask tokens = SAM's single-mask output

    src = src.transpose(1, 2).reshape(b * n, c, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = decoder.output_hypernetworks_mlps[0](mask_token_out)  # (B*N, C/8)
    _, c_up, h_up, w_up = upscaled.shape
    logits = torch.bmm(hyper_in.unsqueeze(1), upscaled.reshape(b * n, c_up, h_up * w_up))
    return logits.reshape(b, n, h_up, w_up)
