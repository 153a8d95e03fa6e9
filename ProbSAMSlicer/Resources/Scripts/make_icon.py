"""Draws Resources/Icons/ProbSAMSlicer.png: several overlapping outlines (samples) inside a box (the ROI).

Run from anywhere: python make_icon.py  (needs Pillow). The PNG is committed; rerun only to change it.
"""

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def outline(cx, cy, radius, wobble, phase, points=90):
    return [(cx + (radius + wobble * math.sin(3 * t + phase)) * math.cos(t),
             cy + (radius + wobble * math.sin(3 * t + phase)) * math.sin(t))
            for t in (2 * math.pi * i / points for i in range(points + 1))]


def main() -> None:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((4, 4, SIZE - 5, SIZE - 5), radius=14, fill=(30, 34, 40, 255))
    draw.rectangle((18, 18, SIZE - 19, SIZE - 19), outline=(235, 235, 235, 255), width=3)  # the ROI
    for n, color in enumerate(COLORS):
        draw.line(outline(64 + 3 * math.cos(n), 64 + 3 * math.sin(n), 28 + 2 * n - 4, 5, n * 1.3),
                  fill=color + (255,), width=4)
    path = Path(__file__).resolve().parents[1] / "Icons" / "ProbSAMSlicer.png"
    image.save(path)
    print(path)


if __name__ == "__main__":
    main()
