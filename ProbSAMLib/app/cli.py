"""The ``probsam`` command: sample a CT volume in a box, run the offline demo, show devices and weights.

    probsam sample CT.nrrd --box 120,80,40,150,110,52 --box-space ijk --samples 16 --seed 0 --out out/
    probsam sample DICOM_FOLDER --roi nodule.mrk.json --out out/
    probsam demo --out demo/
    probsam info
    probsam fetch sam_vit_b [--from FILE]

Bad input or settings end with one line ``probsam: error: ...`` and exit status 2, a failure at run time
with status 1, Ctrl-C with 130 (SIGTERM 143); the status follows the error's type (ProbSAMLib.errors).
Nothing is left behind: results are written by ProbSAMLib.io.outputdir.OutputFolder into a temporary folder
beside --out and moved into place only when complete; --force never replaces a folder that holds an
input, the working folder, home, / or a folder ProbSAM did not write. PROBSAM_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from ProbSAMLib import __version__, errors
from ProbSAMLib.app import options
from ProbSAMLib.app.options import MAX_SEED, UsageError  # noqa: F401 (their home is options; callers use these names)
from ProbSAMLib.errors import EXIT_INTERRUPTED
from ProbSAMLib.weights.registry import DEFAULT_MODEL, MANIFEST, model_entry

# Subcommands that live in their own module: each has add_parser(commands), which sets the parser's
# default ``run`` to its command function (args) -> None.
_EXTRA_COMMANDS = {"batch": "ProbSAMLib.app.batch", "serve": "ProbSAMLib.app.server.command"}


# --- arguments ------------------------------------------------------------------------------------------
def _sampling_options(parser: argparse.ArgumentParser, out_default: Optional[str]) -> None:
    options.sampling_options(parser)
    parser.add_argument("--out", required=out_default is None, default=out_default, type=Path, metavar="DIR",
                        help="output folder (must not exist unless --force)"
                             + (f"; default {out_default}" if out_default else ""))
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="probsam", description="Probabilistic Segment Anything for lung-nodule CT: N plausible 3D "
        "segmentations of the object in a box, and their uncertainty. Research software, not for clinical use.")
    parser.add_argument("--version", action="version", version=f"probsam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    sample = commands.add_parser("sample", help="sample a CT volume inside a 3D box",
                                 description="Sample N segmentations of the object inside a 3D box.")
    sample.add_argument("input", type=Path, metavar="INPUT",
                        help="CT volume (.nrrd, .nii/.nii.gz, .mha, ...) or a DICOM series folder, in HU")
    sample.add_argument("--series-uid", metavar="UID", help="which series of a DICOM folder holding several")
    where = sample.add_mutually_exclusive_group(required=True)
    where.add_argument("--box", metavar="X1,Y1,Z1,X2,Y2,Z2",
                       help="two opposite corners of the box, e.g. --box -40.5,20,-110,-20,45,-90")
    where.add_argument("--roi", type=Path, metavar="ROI.mrk.json", help="a Markups ROI saved from 3D Slicer")
    sample.add_argument("--box-space", choices=options.BOX_SPACES, default=None,
                        help="coordinates of --box: ras (3D Slicer's, mm; default), lps (ITK/DICOM, mm) or "
                             "ijk (inclusive voxel indices)")
    sample.add_argument("--roi-index", type=int, metavar="N", help="which ROI of a file holding several (0-based)")
    _sampling_options(sample, None)
    options.model_options(sample, DEFAULT_MODEL)

    demo = commands.add_parser("demo", help="run the default model on a rendered phantom CT (offline)",
                               description="Render a CT around a real LIDC nodule outline, sample it with the "
                               "model (default: the research model lite_medsam) and write everything plus "
                               "montage.png.")
    demo.add_argument("--nodule", type=int, default=0, metavar="INDEX", help="which bundled nodule (default 0)")
    _sampling_options(demo, "probsam_demo")
    options.model_options(demo, DEFAULT_MODEL)

    info = commands.add_parser("info", help="devices, models, where their weights are, the cache folder")
    info.add_argument("--verify", action="store_true", help="also check the SHA-256 of the weights present")

    fetch = commands.add_parser("fetch", help="download weights into the cache, or install a local file there",
                                description="Put weights where probsam finds them offline. Checks SHA-256.")
    fetch.add_argument("name", help="manifest name (see probsam info), e.g. sam_vit_b")
    fetch.add_argument("--from", dest="source", type=Path, metavar="FILE",
                       help="install this local file (e.g. copied from a machine with internet access)")
    for name, module in _EXTRA_COMMANDS.items():  # commands with their own module: options and cmd there
        importlib.import_module(module).add_parser(commands)
    return parser


class _StoreOnce(argparse._StoreAction):
    """argparse's "store", but an option given twice (a second --box) is recorded instead of the last one
    silently winning; :func:`_check_repeats` refuses it with the one-line error of every bad setting."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_options", {})
        if option_string and self.dest in given:
            namespace.__dict__.setdefault("_repeated_options", []).append(
                (given[self.dest][0], option_string, given[self.dest][1], values))
        if option_string:
            given[self.dest] = (option_string, values)
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """Every parser of the command, subcommands' included: options are stored once (:class:`_StoreOnce`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def _print_message(self, message, file=None):  # argparse's own errors may quote a path that is not UTF-8
        super()._print_message(errors.printable(message) if message else message, file)


def _check_repeats(args) -> None:
    for first, second, value, again in getattr(args, "_repeated_options", []):
        shown = [errors.printable(str(v))[:80] for v in (value, again)]
        same = f"{first}" if first == second else f"{first} and {second}"
        hint = " (one box per run: run probsam sample again, or probsam batch, for another)" \
            if first in ("--box", "--roi") else ""
        raise UsageError(f"{same} given twice ({shown[0]!r} and {shown[1]!r}); give it once{hint}")


def _join_negative_box(argv: Sequence[str]) -> list:
    """``--box -10,5,...``: argparse would read the value as an option; pass it as ``--box=-10,...``."""
    out = []
    for arg in argv:
        if out and out[-1] == "--box" and arg.startswith("-") and "," in arg:
            out[-1] = "--box=" + arg
        else:
            out.append(arg)
    return out


# --- shared steps ---------------------------------------------------------------------------------------
def _inputs(args) -> list:
    """Every file or folder the command reads (its parser's ``type=Path`` options but --out): --force may
    never delete them, and --out may not lie inside them."""
    from ProbSAMLib.io.outputdir import parser_inputs

    return parser_inputs(build_parser(), args)


def _output_folder(args):
    from ProbSAMLib.io.outputdir import OutputFolder

    # the marker names the command, so --force replaces only what this command wrote
    return OutputFolder(args.out, args.force, inputs=_inputs(args), tool=f"probsam {args.command}")


def _check_output(args) -> None:
    """Refuse an unusable --out before any work is done (the writer checks again at the end)."""
    _output_folder(args).check()


def _check_prompt(args) -> None:
    """--box-space goes with --box, --roi-index with --roi; --box's numbers are checked here, naming the
    option, before the volume is read."""
    from ProbSAMLib.geometry import parse_box_values

    if args.roi is not None and args.box_space is not None:
        raise UsageError(f"--box-space applies to --box only; the ROI file {args.roi} carries its own coordinate "
                         f"system")
    if args.box is not None and args.roi_index is not None:
        raise UsageError("--roi-index applies to --roi only")
    args.box_space = args.box_space or "ras"
    if args.box is not None:
        try:
            parse_box_values(args.box)
        except ValueError as error:
            raise UsageError(f"--box: {error}") from None


def _voxel_box(args, geometry):
    """(VoxelBox, request, the ROI's Box3D or None) of --box or --roi; an error names which one it is about."""
    return options.voxel_box_for(geometry, args.box, args.box_space, args.roi, args.roi_index)


@contextlib.contextmanager
def _progress_bar(args):
    """A tqdm bar on stderr fed by sample_volume's progress(fraction, message); off when not a TTY."""
    from tqdm.auto import tqdm

    disable = args.quiet or not sys.stderr.isatty()
    # shutil falls back to 80 columns where a terminal reports width 0 (tqdm would draw nothing there).
    with tqdm(total=100, desc="sampling", file=sys.stderr, disable=disable, ncols=shutil.get_terminal_size().columns,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}") as bar:
        def update(fraction: float, message: str) -> None:
            bar.n = round(100 * fraction)
            bar.set_postfix_str(message, refresh=False)
            bar.refresh()
        yield update


def _sample(args, model, volume, geometry, voxel_box):
    from ProbSAMLib.inference.volume import sample_volume

    if voxel_box.clamped:
        print(f"probsam: warning: {voxel_box.warning}", file=sys.stderr)
    with _progress_bar(args) as progress:
        return sample_volume(model, volume, geometry, voxel_box, n_samples=args.samples, seed=args.seed,
                             z_mode=args.z_mode, slice_batch=args.slice_batch, progress=progress,
                             box_mode=args.box_mode)


def _print_report(args, result, out: Path) -> None:
    if args.quiet:
        return
    s, box = result.summary, result.summary["box"]
    spread, settings = s["spread"], s["settings"]
    volume, diameter, dice = spread["volume_mm3"], spread["longest_axial_diameter_mm"], spread["pairwise_dice"]
    lines = [f"{settings['n_samples']} samples ({settings['z_mode']}, seed {settings['seed']}) in the box "
             f"i {box['ijk_first'][0]}..{box['ijk_last'][0]}, j {box['ijk_first'][1]}..{box['ijk_last'][1]}, "
             f"k {box['ijk_first'][2]}..{box['ijk_last'][2]} on {settings['device']} in "
             f"{s['timings_s']['total_s']:.1f} s",
             f"  volume            {volume['mean']:.1f} ± {volume['sd']:.1f} mm³ "
             f"(min {volume['min']:.1f}, max {volume['max']:.1f}; {spread['empty_samples']} empty)",
             f"  axial diameter    {diameter['mean']:.1f} ± {diameter['sd']:.1f} mm"]
    if dice["mean"] is not None:
        lines.append(f"  pairwise Dice     {dice['mean']:.3f} ± {dice['sd']:.3f}; sample diversity "
                     f"(mean 1 - IoU) {spread['sample_diversity'] or 0:.3f}")
    if "consensus_volume_mm3" in spread:
        lines.append(f"  consensus         {spread['consensus_volume_mm3']:.1f} mm³ (voxels in more than half of "
                     f"the samples)")
    share = s.get("marking_share")
    lines.append(f"  readers marking   {'n/a (this model has no marking head)' if share is None else f'{share:.0%}'}"
                 + ("" if share is None else " expected to mark this lesion at all (the model's estimate)"))
    lines.append(f"wrote {out}/: {', '.join(s.get('files', []))}")
    lines.append("Research software, not for clinical use.")
    print("\n".join(lines))


# --- commands -------------------------------------------------------------------------------------------
def cmd_sample(args) -> None:
    import numpy as np
    import SimpleITK as sitk

    from ProbSAMLib.io import imageio
    from ProbSAMLib.app import report
    from ProbSAMLib.app.jobs import cut_to_roi
    from ProbSAMLib.geometry import VolumeGeometry

    options.check_settings(args)
    _check_prompt(args)
    _check_output(args)
    image = imageio.read_volume(args.input, args.series_uid)
    geometry = VolumeGeometry.from_sitk(image)
    voxel_box, request, roi = _voxel_box(args, geometry)
    model = options.load_model(args)
    volume = sitk.GetArrayViewFromImage(image).astype(np.float32, copy=False)
    result = _sample(args, model, volume, geometry, voxel_box)
    cut_to_roi(result, roi)  # a rotated ROI: the samples end at its own faces, not its voxel hull's (as in Slicer)
    extra = {"command": "sample", "probsam_version": __version__, "model": options.model_description(args),
             "input": {"path": str(args.input), "series_uid": args.series_uid}, "request": request}
    with _output_folder(args) as tmp:
        report.write_outputs(result, tmp, split=args.split, extra_summary=extra,
                             tags=options.sample_tags(args.model, len(result.masks)))
    result.summary["files"] = sorted(p.name for p in Path(args.out).iterdir() if not p.name.startswith("."))
    _print_report(args, result, Path(args.out))


def cmd_demo(args) -> None:
    import numpy as np
    import SimpleITK as sitk

    from ProbSAMLib.io import imageio, segfile
    from ProbSAMLib import metrics
    from ProbSAMLib.app import montage, report
    from ProbSAMLib.geometry import VolumeGeometry
    from ProbSAMLib.demo.phantom import demo_box, demo_count, demo_volume

    options.check_settings(args)
    _check_output(args)
    if not 0 <= args.nodule < demo_count():
        raise UsageError(f"--nodule must be 0..{demo_count() - 1}, got {errors.shown(args.nodule)}")
    model = options.load_model(args)
    # A model that sees millimetres or whole slices (LiteMedSAM) gets a whole chest slice around the nodule,
    # as in its training data; the tiny crop models the small patch they were trained on.
    field = "local" if model.config.field_of_view == "crop" else "chest"
    phantom = demo_volume(args.nodule, seed=0, field=field)
    image = sitk.Cast(phantom.image, sitk.sitkFloat32)
    geometry = VolumeGeometry.from_sitk(image)
    voxel_box = demo_box(phantom.reader_masks, geometry)
    volume = sitk.GetArrayFromImage(image)
    result = _sample(args, model, volume, geometry, voxel_box)
    inside = (slice(None),) + voxel_box.slices()
    samples, readers = result.masks, phantom.reader_masks[inside]  # both cut to the box
    title = f"ProbSAM ({args.model}, research model) on a rendered phantom CT " \
            f"(LIDC nodule outline {args.nodule}, {len(readers)} readers)"
    extra = {"command": "demo", "probsam_version": __version__, "model": options.model_description(args),
             "demo": {"nodule": args.nodule, "info": phantom.info, "readers": len(readers),
                      "note": "rendered CT around real LIDC-IDRI reader outlines; the readers' masks are in "
                              "readers.seg.nrrd",
                      "vs_readers": {"ged": metrics.ged(samples, readers), "hm_iou": metrics.hm_iou(samples, readers),
                                     "dmax": metrics.dmax(samples, readers)}}}
    with _output_folder(args) as tmp:
        imageio.write_image(volume, geometry, tmp / "ct.nrrd", np.int16)
        segfile.write_segmentation(phantom.reader_masks, geometry, tmp / "readers.seg.nrrd",
                                   names=[f"Reader {n + 1}" for n in range(len(readers))])
        montage.write_montage(tmp / "montage.png", volume, result, title)
        report.write_outputs(result, tmp, split=args.split, extra_summary=extra,
                             tags=options.sample_tags(args.model, len(result.masks)),
                             other_files=("ct.nrrd", "readers.seg.nrrd", "montage.png"))
    result.summary["files"] = sorted(p.name for p in Path(args.out).iterdir() if not p.name.startswith("."))
    _print_report(args, result, Path(args.out))
    if not args.quiet:
        print(f"Open {Path(args.out) / 'montage.png'} to look, or load ct.nrrd and samples.seg.nrrd in 3D Slicer.")


def cmd_info(args) -> None:
    from ProbSAMLib.weights import checkpoints
    from ProbSAMLib.inference.device import choose_device, mps_works

    import torch

    print(f"probsam {__version__} (research software, not for clinical use); torch {torch.__version__}, "
          f"Python {sys.version.split()[0]}")
    print("devices:")
    print(f"  cpu   available ({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"  cuda  available: {names} (bf16 autocast: {torch.cuda.is_bf16_supported()})")
    else:
        print(f"  cuda  not available (torch CUDA build: {torch.version.cuda or 'none'})")
    print(f"  mps   {'available' if mps_works() else 'not available'}")
    print(f"  auto  -> {choose_device('auto')}")
    print(f"weights cache: {checkpoints.cache_dir()}  (set PROBSAM_CACHE to move it)")
    print(f"weights (--model {DEFAULT_MODEL}, the default, uses '{model_entry(DEFAULT_MODEL).weights.name}'; "
          f"--model vit_b uses 'sam_vit_b' plus --checkpoint heads):")
    for entry in MANIFEST.values():
        path = checkpoints.located(entry)  # the cache, the package, or the installed package that ships it
        status = "present" if path.is_file() else "absent"
        if path.is_file() and args.verify:
            try:
                checkpoints.verify_sha256(path, entry.sha256)
                status += ", SHA-256 ok" if entry.sha256 else ", no checksum listed"
            except errors.CheckpointError:
                status += ", SHA-256 MISMATCH (delete it and fetch again)"
        size = f"{entry.size / 1e6:.0f} MB" if entry.size else "bundled" if entry.bundled else "?"
        print(f"  {entry.name:<10} {status:<8} {size:>8}  {path}")
        print(f"  {'':<10} {entry.description.rstrip('.')}; licence {entry.licence}"
              + (f"; {entry.url}" if entry.url else ""))
    print("offline: copy a downloaded file into the cache with `probsam fetch NAME --from FILE`, or pass it "
          "with --sam-checkpoint / --checkpoint.")


def cmd_fetch(args) -> None:
    from ProbSAMLib.weights import checkpoints

    if args.name not in MANIFEST:
        raise UsageError(f"unknown weights {args.name!r}; known: {', '.join(MANIFEST)}")
    if MANIFEST[args.name].bundled:
        raise UsageError(f"{args.name!r} is bundled with ProbSAM and cannot be fetched or replaced; use "
                         f"--model file --checkpoint FILE to run other weights")
    if args.source is not None:
        if not args.source.is_file():
            raise errors.WeightsError(f"weights file {args.source} does not exist")
        path = checkpoints.copy_into_cache(args.source, args.name)
    else:
        path = checkpoints.resolve_weights(args.name, download=not errors.env_flag("PROBSAM_OFFLINE"))
    print(f"{args.name}: {path}")


COMMANDS = {"sample": cmd_sample, "demo": cmd_demo, "info": cmd_info, "fetch": cmd_fetch}


@contextlib.contextmanager
def _warnings_as_lines():
    """Library warnings (e.g. 'no ProbSAM heads given') as one line each, not Python's file:line format."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"probsam: warning: {errors.printable(' '.join(str(message).split()))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``probsam`` console script; returns the exit status.

    Everything after argument parsing, imports of torch included, runs inside errors.run_main, so Ctrl-C or
    SIGTERM at any moment ends with one line and no output folder.
    """
    errors.tolerant_console()  # before argparse, whose messages may hold any character of a path
    args = build_parser().parse_args(_join_negative_box(sys.argv[1:] if argv is None else argv))
    return errors.run_main("probsam", lambda: _run(args))


def _run(args) -> int:
    from ProbSAMLib.errors import Cancelled

    _check_repeats(args)
    try:
        with _warnings_as_lines():
            (COMMANDS.get(args.command) or args.run)(args)
    except Cancelled:
        print("probsam: cancelled; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
