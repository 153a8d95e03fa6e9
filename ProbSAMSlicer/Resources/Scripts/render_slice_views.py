"""Render what a user of the module sees in a slice view, on REAL Slicer core (slicer-core), to PNG.

    PYTHONPATH=. python ProbSAMSlicer/Resources/Scripts/render_slice_views.py docs/images/slicer_slice_views.png [model]

It builds the phantom CT of ``probsam demo`` (nodule 0) and an ROI around the readers' outlines, runs the
module's Logic (worker process, the given model, else the default, 16 samples, CPU, seed 0), and renders one
axial slice through the nodule three times: the consensus outline, the 16 sample outlines, and the
entropy overlay with its colour scale.

How the pixels are made (said in the picture too): the CT and the overlay are composited by Slicer's own
slice pipeline (vtkMRMLSliceLogic: reslice, the overlay's colour table, threshold transparency and 60 %
opacity, blend), at the slice node's field of view. The outlines are NOT drawn by Slicer's segmentation
displayable manager (that needs an OpenGL view, which slicer-core without Qt has not): each segment is
exported with slicer.util.arrayFromSegmentBinaryLabelmap, looked up at every slice pixel's RAS position
and its border drawn in the segment's colour. Slicer's Qt and Slicer's installers are stand-ins here
(Testing/slicer_standin), as in the tests.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

PIXELS = 256  # per panel (the slice logic's default image size)
FIELD_MM = 40.0
# matplotlib's viridis at 9 stops (its published table), interpolated: slicer-core has no colour files.
VIRIDIS = np.array([[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
                    [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]], float) / 255


def viridis_node(slicer):
    """A colour table named "Viridis", so the module styles the overlay as in Slicer."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "Viridis")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    x = np.linspace(0, 1, 256)
    stops = np.linspace(0, 1, len(VIRIDIS))
    for n in range(256):
        rgb = [np.interp(x[n], stops, VIRIDIS[:, c]) for c in range(3)]
        node.SetColor(n, f"{n}", *rgb, 1.0)
    return node


def run_module(slicer, model: str):
    """The phantom scene and one run of the module's Logic; (volume, roi, RoiOutputs)."""
    import ProbSAMSlicer

    test = ProbSAMSlicer.ProbSAMSlicerTest()
    volume, roi, _reference = test._phantomScene()
    viridis_node(slicer)
    logic = ProbSAMSlicer.ProbSAMSlicerLogic()
    try:
        out = logic.process(volume, [roi], numberOfSamples=16, seed=0, model=model, device="cpu")[0]
    finally:
        logic.stopWorker()
    return volume, roi, out


def slice_logic(slicer, volume, foreground, center_ras):
    """An axial slice view (Slicer's slice logic) through ``center_ras``: CT behind, ``foreground`` over it."""
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(slicer.mrmlScene)
    logic.SetMRMLApplicationLogic(slicer.applicationLogic)
    node = logic.AddSliceNode("Red")
    node.SetOrientationToAxial()
    node.SetDimensions(PIXELS, PIXELS, 1)
    composite = logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(volume.GetID())
    composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    composite.SetForegroundOpacity(0.6)
    node.SetFieldOfView(FIELD_MM, FIELD_MM, 1.0)
    node.JumpSliceByCentering(*center_ras)
    node.UpdateMatrices()
    logic.UpdatePipeline()  # the reslice output takes the node's dimensions
    return logic, node


def composited_rgb(logic) -> np.ndarray:
    """(rows, cols, 3) uint8 of Slicer's blended slice image, top row first."""
    from vtk.util import numpy_support

    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    cols, rows, _ = image.GetDimensions()
    assert (cols, rows) == (PIXELS, PIXELS), f"slice image {cols} x {rows}, expected {PIXELS} x {PIXELS}"
    rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, cols, -1)
    return np.ascontiguousarray(rgba[::-1, :, :3])


def pixel_to_ijk(node, volume) -> np.ndarray:
    """(rows, cols, 3) nearest CT voxel (k, j, i) of every slice pixel (top row first)."""
    import vtk

    xy_to_ras = np.array([[node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ras_to_ijk = np.linalg.inv(np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))
    y, x = np.mgrid[PIXELS - 1:-1:-1, 0:PIXELS]
    xy = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], axis=-1).astype(float)
    ijk = np.rint((xy @ xy_to_ras.T) @ ras_to_ijk.T)[..., :3].astype(int)
    return ijk[..., ::-1]


def draw_outline(rgb, mask_full, kji, color) -> None:
    """The border of a segment (full-grid bool array) on the slice pixels, in ``color``."""
    shape = np.array(mask_full.shape)
    valid = np.all((kji >= 0) & (kji < shape), axis=-1)
    k, j, i = (np.clip(kji[..., a], 0, shape[a] - 1) for a in range(3))
    mask = mask_full[k, j, i] & valid
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    rgb[mask & ~inner] = (np.asarray(color) * 255).astype(np.uint8)


def legend(height: int, maximum: float, draw, x: int, font) -> None:
    """A vertical colour scale 0..maximum (nats), as the colour legend node shows it."""
    for row in range(height):
        value = 1 - row / (height - 1)
        rgb = [int(255 * np.interp(value, np.linspace(0, 1, len(VIRIDIS)), VIRIDIS[:, c])) for c in range(3)]
        draw.line([(x, 30 + row), (x + 14, 30 + row)], fill=tuple(rgb))
    draw.text((x - 6, 14), f"{maximum:.2f}", fill="white", font=font)
    draw.text((x + 2, 34 + height), "0", fill="white", font=font)
    draw.text((x - 12, 50 + height), "nats", fill="white", font=font)


def render(path: Path, model: str = "") -> None:
    from PIL import Image, ImageDraw, ImageFont

    import slicer_standin

    slicer = slicer_standin.install()
    import ProbSAMSlicer

    model = model or ProbSAMSlicer.DEFAULT_MODEL
    volume, roi, out = run_module(slicer, model)
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(1500, -600)  # the lung window a reader would choose
    center = np.array(roi.GetCenter())
    node = out.segmentationNode
    segmentation = node.GetSegmentation()
    full = {sid: slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume) > 0
            for sid in ["Consensus"] + out.sampleSegmentIds()}
    entropy = out.mapNodes["entropy"]
    panels = []
    logic, slice_node = slice_logic(slicer, volume, None, center)  # one slice view, as in Slicer's Red view
    kji = pixel_to_ijk(slice_node, volume)
    for title, foreground, segments in (("consensus (more than half of 16 samples)", None, ["Consensus"]),
                                        ("16 samples", None, out.sampleSegmentIds()),
                                        ("entropy overlay", entropy, [])):
        logic.GetSliceCompositeNode().SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        logic.UpdatePipeline()
        rgb = composited_rgb(logic)
        for sid in segments:
            draw_outline(rgb, full[sid], kji, segmentation.GetSegment(sid).GetColor())
        panels.append((title, rgb))
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (3 * PIXELS + 70, PIXELS + 64), "black")
    draw = ImageDraw.Draw(canvas)
    for n, (title, rgb) in enumerate(panels):
        canvas.paste(Image.fromarray(rgb), (n * PIXELS, 22))
        draw.text((n * PIXELS + 6, 4), title, fill="white", font=font)
    legend(PIXELS - 80, float(slicer.util.arrayFromVolume(entropy).max()), draw, 3 * PIXELS + 30, font)
    draw.text((6, PIXELS + 28), "Rendered on slicer-core: CT and overlay composited by Slicer's slice logic "
              "(vtkMRMLSliceLogic); outlines drawn from the segments' arrays.", fill="white", font=font)
    draw.text((6, PIXELS + 44), f"Phantom CT, model {model}. Research software, not for clinical use.",
              fill="white", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path}")
    slicer_standin.uninstall()


if __name__ == "__main__":
    render(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "images" / "slicer_slice_views.png"),
           sys.argv[2] if len(sys.argv) > 2 else "")
