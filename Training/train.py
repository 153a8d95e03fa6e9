"""Train Probabilistic SAM (or the Prob U-Net baseline) on a slice data set. Read top to bottom.

    python Training/train.py Training/configs/phantom_tiny.yaml                 # one process
    python Training/train.py Training/configs/phantom_tiny.yaml lr=3e-4 max_steps=500 --no-cache
    python Training/train.py Training/configs/phantom_tiny.yaml --resume        # continue from ckpt.pt
    torchrun --nproc_per_node=4 Training/train.py Training/configs/lidc_vit_b.yaml   # DDP, one GPU each

Each step: a seeded batch of slices, one of the 4 reader slots per slice as the target (a reader who did
not mark the slice is an empty mask), the union box of all
readers (with jitter) as the prompt, BCE + Dice + beta*KL. Every ``eval_interval`` steps: GED@16 on a
fixed validation subset; the best model by that GED goes to best.safetensors; with early_stop_patience,
training stops once that many evaluations in a row bring no better GED (max_steps is the compute budget,
early stopping only ends a run sooner). ckpt.pt holds everything needed for an exact resume (weights,
optimiser, step, best score, evaluations since the best, training seconds so far). The crop size the
model trained on is written into its config (context_size) for the volume sampler. Logs: TensorBoard +
log.jsonl in out/.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python Training/train.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ProbSAMLib import errors  # noqa: E402 (first: Ctrl-C or a bad setting from here on is one line)

errors.install_script_handler("train.py")
errors.pause_point("startup")

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ProbSAMLib.inference.device import autocast, choose_device
from ProbSAMLib.io.outputdir import parser_inputs
from Training import guards
from Training.config import load_config
from Training.data import embedding_cache
from Training.data.batches import (SliceBatches, batch_positions, choose_marked_readers, choose_readers, step_rng,
                                   validation_positions)
from Training.data.dataset_format import load_split
from Training.evaluation.scoring import evaluate_slices, summarise
from Training.learning.learners import build_learner, parameter_groups

# ---- settings -------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="Train ProbSAM or the Prob U-Net baseline.")
parser.add_argument("config", nargs="?", type=Path, help="Training/configs/*.yaml")  # type=Path: an input
parser.add_argument("overrides", nargs="*", help="key=value settings that replace the config file's "
                    "(a loss setting: beta=2 or loss.beta=2)")
parser.add_argument("--no-cache", action="store_true", help="encode images every step (to fine-tune the encoder)")
parser.add_argument("--resume", action="store_true", help="continue the run in `out` from its ckpt.pt")
args = parser.parse_intermixed_args()  # flags may come before, between or after key=value
if args.config and "=" in str(args.config):  # only overrides were given
    args.overrides.insert(0, str(args.config))
    args.config = None
# Every setting is checked (types, ranges, files, device, data set) before anything is created.
cfg = load_config(args.config, args.overrides)
out = Path(cfg.out)
if args.resume:
    guards.check_run_folder(out, resume=True)
    cfg = load_config(str(out / "config.yaml"), args.overrides)
# What the run reads: the parser's path options (the config file) and the config's (data=, init=, ...).
reads = parser_inputs(parser, args, outputs=()) + cfg.inputs()
if args.resume:  # the run's own config.yaml is read and rewritten by design
    reads = [p for p in reads if Path(p).resolve() != (out / "config.yaml").resolve()]
out_existed = guards.check_run_folder(out, args.resume, inputs=reads)
for option in ("init", "sam_checkpoint", "anchor"):
    if getattr(cfg, option):
        guards.existing_file(option, getattr(cfg, option))
if args.no_cache:
    cfg.cache = False
    cfg.freeze_encoder = False  # the point of --no-cache is to train the encoder

# ---- processes and devices ---------------------------------------------------------------------------
distributed = "RANK" in os.environ
if distributed:  # launched by torchrun
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # Naming each rank's GPU (torch >= 2.3) spares NCCL guessing it from the rank, which can hang.
    bound = {"device_id": device} if use_cuda and "device_id" in inspect.signature(dist.init_process_group).parameters else {}
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", **bound)
else:
    rank, world_size = 0, 1
    device = choose_device(cfg.device)
main_process = rank == 0
if cfg.num_threads:
    torch.set_num_threads(cfg.num_threads)
torch.manual_seed(cfg.seed)
use_bf16 = cfg.bf16 and device.type == "cuda"


def barrier() -> None:
    if distributed:
        dist.barrier()


# ---- data, model, optimiser ------------------------------------------------------------------------------
train_data = SliceBatches(load_split(cfg.data, "train"), box_margin=cfg.box_margin)
val_data = SliceBatches(load_split(cfg.data, "val"), box_margin=cfg.box_margin)
learner = build_learner(cfg, train_data.dataset.intensity, context_size=max(train_data.image_hw)).to(device)
if cfg.model == "probsam" and train_data.window is not None:  # HU data are read with the model's own window
    train_data.window = val_data.window = learner.window
if learner.reads_neighbours and train_data.dataset.neighbours is None:
    raise errors.SettingsError(f"the model reads the slices below and above (neighbour_slices), but {cfg.data} has "
                               f"no neighbours.npy; rebuild it with make_phantom.py or prepare_lidc.py")
use_cache = learner.caches_embeddings and cfg.cache
resume_state = (guards.load_resume_state(out / "ckpt.pt", device, cfg.max_steps)  # before any write
                if args.resume else None)
if resume_state is not None:
    try:
        learner.load_state_dict(resume_state["learner"])
    except RuntimeError as error:
        raise errors.InputError(f"{out / 'ckpt.pt'} does not fit the configured model: "
                                f"{errors.message(error)}") from None
if main_process:
    if not out_existed:  # a run that fails before its first checkpoint leaves no folder behind
        errors.on_failure(lambda: guards.remove_unfinished_run(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    n_params = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    print(f"{cfg.model} ({cfg.preset if cfg.model == 'probsam' else cfg.unet_channels}): {n_params / 1e6:.2f}M "
          f"trainable parameters on {device} x{world_size}; embedding cache {'on' if use_cache else 'off'}")

train_cache = val_cache = None
if use_cache:  # rank 0 encodes every slice once; the others wait, then everyone memory-maps the file
    cache_dir = out / "embedding_cache"
    flips = {"train": cfg.flip, "val": False}  # validation reads unflipped slices
    data_of = {"train": train_data, "val": val_data}
    paths = {split: embedding_cache.cache_file(cache_dir, data_of[split], split, learner.model, flips[split])
             for split in ("train", "val")}
    if main_process:
        for split in ("train", "val"):
            embedding_cache.build_cache(learner.model, data_of[split], paths[split], flips=flips[split])
    barrier()
    train_cache, val_cache = (embedding_cache.open_cache(paths[s]) for s in ("train", "val"))

groups = parameter_groups(learner, cfg)
lr_scales = [group["lr_scale"] for group in groups]  # the configuration's, also on --resume
optimiser = torch.optim.AdamW(groups, lr=cfg.lr)
step, best_ged, evals_since_best, train_seconds = 0, math.inf, 0, 0.0
if resume_state is not None:
    optimiser.load_state_dict(resume_state["optimiser"])  # brings the saved groups' settings back
    step, best_ged = resume_state["step"], resume_state["best_ged"]
    evals_since_best = resume_state.get("evals_since_best", 0)
    train_seconds = resume_state.get("train_seconds", 0.0)
    if main_process:
        print(f"resumed at step {step} (best validation GED@16 {best_ged:.4f})")
model = DistributedDataParallel(learner, find_unused_parameters=True) if distributed else learner


def learning_rate(step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr over lr_decay_steps (nanoGPT's schedule)."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def validation_ged() -> dict:
    positions = validation_positions(len(val_data), cfg.eval_slices, cfg.seed)
    embeddings_of = (lambda p: embedding_cache.cached_embeddings(val_cache, p, device)) if use_cache else None
    rows = evaluate_slices(learner, val_data, positions, (cfg.eval_samples,), cfg.seed, 32, device,
                           embeddings_of, progress=False)
    learner.train()
    return summarise(rows)


def save_checkpoint() -> None:
    """ckpt.pt for resuming, written atomically (an interrupted save keeps the previous one)."""
    state = {"learner": learner.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
             "best_ged": best_ged, "evals_since_best": evals_since_best, "train_seconds": train_seconds,
             "config": cfg.to_dict()}
    torch.save(state, out / "ckpt.pt.part")
    os.replace(out / "ckpt.pt.part", out / "ckpt.pt")


writer = None
if main_process:
    try:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    except ImportError:
        print("tensorboard is not installed: logging to log.jsonl only (pip install tensorboard)")
log_file = open(out / "log.jsonl", "a", encoding="utf-8") if main_process else None


def log(record: dict) -> None:
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    if writer:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, record["step"])


# ---- the loop -------------------------------------------------------------------------------------------
learner.train()
bar = tqdm(total=cfg.max_steps, initial=step, disable=not main_process, desc="training")
started = time.perf_counter()
stopped_early = evals_since_best >= cfg.early_stop_patience > 0
while step < cfg.max_steps and not stopped_early:
    step_started = time.perf_counter()
    lr = learning_rate(step)
    for group, scale in zip(optimiser.param_groups, lr_scales):
        group["lr"] = lr * scale
    # Everything random in a step derives from (seed, step, rank): a resumed run repeats it exactly.
    positions = batch_positions(len(train_data), cfg.batch_size, step, cfg.seed, rank, world_size)
    rng = step_rng(cfg.seed, step, rank)
    batch = train_data.read(positions, rng, cfg.box_jitter, cfg.box_jitter_max_px, flip=cfg.flip)
    readers = choose_marked_readers(batch.masks, rng) if cfg.targets == "marked" else choose_readers(batch.present, rng)
    targets = batch.masks[torch.arange(len(readers)), readers]
    torch.manual_seed(int(step_rng(cfg.seed, step, rank, stream=1).integers(2**62)))
    embeddings = (embedding_cache.cached_embeddings(train_cache, positions, device, batch.flips)
                  if use_cache else None)

    # The set term (loss.set_weight > 0) compares prior samples with all 4 reader slots, an absent reader
    # being an empty mask, exactly as evaluation counts them; `voters` are the slots whose reader annotated
    # the nodule (the consensus term's "readers" and "two", the anchor term).
    all_slots = torch.ones_like(batch.present)
    with autocast(device, use_bf16):
        parts = model(batch.model_images(learner.reads_neighbours).to(device), batch.boxes.to(device), targets.to(device), step, embeddings=embeddings,
                      readers=batch.masks.to(device), present=all_slots.to(device), voters=batch.present.to(device))
    optimiser.zero_grad(set_to_none=True)
    parts["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
    optimiser.step()
    step += 1
    train_seconds += time.perf_counter() - step_started  # training compute only (no evaluation)
    bar.update(1)

    if main_process and (step % cfg.log_interval == 0 or step == cfg.max_steps):
        record = {"step": step, "lr": lr, "grad_norm": float(grad_norm),
                  "seconds": round(time.perf_counter() - started, 2), "train_seconds": round(train_seconds, 2),
                  **{f"train/{k}": float(v.detach()) for k, v in parts.items()}}
        log(record)
        bar.set_postfix(loss=f"{record['train/loss']:.1f}", kl=f"{record['train/kl']:.2f}")
    if step % cfg.eval_interval == 0 or step == cfg.max_steps:
        if main_process:
            scores = validation_ged()
            # the model is chosen in the protocol it is trained for: only the readers who marked the slice for
            # targets "marked" (the product model), all reader slots otherwise (the literature's)
            ged16 = scores[f"ged_marked@{cfg.eval_samples}" if cfg.targets == "marked" else f"ged@{cfg.eval_samples}"]
            log({"step": step, **{f"val/{k}": v for k, v in scores.items()}})
            tqdm.write(f"step {step}: val GED@{cfg.eval_samples} ({'marked readers' if cfg.targets == 'marked' else 'all slots'}) {ged16:.4f}, HM-IoU "
                       f"{scores[f'hm_iou@{cfg.eval_samples}']:.4f}, diversity {scores[f'diversity@{cfg.eval_samples}']:.4f}")
            if ged16 < best_ged:
                best_ged, evals_since_best = ged16, 0
                learner.save(out / "best.safetensors", extra={"step": step, "val_ged16": ged16, "config": cfg.to_dict()})
            else:
                evals_since_best += 1
            save_checkpoint()
        if distributed:  # every process must leave the loop together
            flag = torch.tensor([float(evals_since_best)], device=device)
            dist.broadcast(flag, 0)
            evals_since_best = int(flag.item())
        stopped_early = evals_since_best >= cfg.early_stop_patience > 0
        if main_process and stopped_early:
            tqdm.write(f"early stop at step {step}: {evals_since_best} evaluations without a better val GED")
        barrier()

bar.close()
if distributed:  # every replica must hold the same weights after DDP's all-reduced updates
    checksum = torch.stack([p.detach().double().sum() for p in learner.parameters()]).sum().reshape(1).to(device)
    checksums = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(checksums, checksum)
    if main_process:
        spread = float(torch.cat(checksums).max() - torch.cat(checksums).min())
        log({"step": step, "world_size": world_size, "replica_checksum_spread": spread})
        print(f"{world_size} replicas, weight checksum spread {spread:.3g}")
if main_process:
    learner.save(out / "last.safetensors", extra={"step": step, "config": cfg.to_dict()})
    log({"step": step, "done": True, "stopped_early": bool(stopped_early), "train_seconds": round(train_seconds, 2),
         "best_val_ged": best_ged})
    best = (f" -> {out / 'best.safetensors'}" if (out / "best.safetensors").is_file()
            else " (no best file: no evaluation ran)")
    print(f"done: {step} steps ({train_seconds:.0f} s of training compute"
          f"{', stopped early' if stopped_early else ''}); best validation GED@{cfg.eval_samples} "
          f"{best_ged:.4f}{best}")
    log_file.close()
    if writer:
        writer.close()
if distributed:
    # Leave together: a rank that tears gloo down while rank 0 still writes its files can abort at exit
    # ("terminate called without an active exception") on a loaded machine.
    barrier()
    dist.destroy_process_group()
