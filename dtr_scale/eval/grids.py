"""Sample pictures a person can read: images enlarged by an integer factor with nearest-neighbour
(every sample pixel becomes a factor x factor block, nothing is blurred), each captioned with its
class, and the strip of the same samples (same seeds, same labels) across a run's checkpoints,
one row per checkpoint, that shows how the samples sharpen as training goes on.

    FOLDER/grid.png                      one samples folder's grid (see generate.py)
    RUN_DIR/eval/samples_by_step.png     the strip, rewritten with each evaluation report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dtr_scale.eval.settings import eval_dir, record_key
from dtr_scale.io import atomic_write

CELL_TARGET = 64  # small samples are enlarged to at least this many pixels a side
CAPTION = 14  # pixels of caption above each cell
PAD = 4
ROW_LABEL = 80  # pixels left of each row for its label, when rows are labelled
PAPER = (255, 255, 255)
INK = (0, 0, 0)
STRIP_NAME = "samples_by_step.png"
STRIP_SAMPLES = 10  # the first samples of each checkpoint (balanced labels: one of each of 10 classes)
STRIP_MAX_ROWS = 12


@dataclass(frozen=True)
class Cell:
    """Where sample image `index` sits: its enlarged pixels start at (left, top)."""

    index: int
    left: int
    top: int


def upscale_factor(size: int, target: int = CELL_TARGET) -> int:
    """The smallest integer factor that makes a `size`-pixel image at least `target` pixels."""
    return max(1, -(-target // size))


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour: pixel (y, x) becomes the block [y*f:(y+1)*f, x*f:(x+1)*f]."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def caption_of(label: int, cell_width: int) -> str:
    return f"class {label}" if cell_width >= 56 else str(label)


def labelled_grid(images: np.ndarray, labels: np.ndarray, order: list[int], columns: int,
                  row_labels: list[str] | None = None) -> tuple[Image.Image, list[Cell]]:
    """images [N, H, W, 3] uint8 laid out in `order` (index -1: an empty cell), `columns` to a
    row, each enlarged by upscale_factor(H) under a caption naming its class; optional row labels."""
    height, width = images.shape[1:3]
    factor = upscale_factor(max(height, width))
    cell_w, cell_h = width * factor, height * factor
    rows = -(-len(order) // columns)
    left0 = ROW_LABEL if row_labels else 0
    canvas = Image.new("RGB", (left0 + PAD + columns * (cell_w + PAD), PAD + rows * (CAPTION + cell_h + PAD)), PAPER)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    cells = []
    for position, index in enumerate(order):
        row, column = divmod(position, columns)
        left = left0 + PAD + column * (cell_w + PAD)
        top = PAD + row * (CAPTION + cell_h + PAD) + CAPTION
        if row_labels and column == 0:
            draw.text((PAD, top + cell_h // 2 - 6), row_labels[row], fill=INK, font=font)
        if index < 0:
            continue
        draw.text((left, top - CAPTION + 1), caption_of(int(labels[index]), cell_w), fill=INK, font=font)
        canvas.paste(Image.fromarray(upscale(np.ascontiguousarray(images[index]), factor)), (left, top))
        cells.append(Cell(index, left, top))
    return canvas, cells


def save_png(image: Image.Image, path: str | Path) -> Path:
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return Path(path)


def strip_rows(records: list[dict[str, Any]], max_rows: int = STRIP_MAX_ROWS) -> list[dict[str, Any]]:
    """One evaluation record per checkpoint step whose samples are on disk, all drawn with the
    same settings (those most records share, EMA first), at most `max_rows` spread evenly."""
    usable = [r for r in records if r.get("samples") and Path(r["samples"]).exists()]
    if not usable:
        return []
    settings = [record_key(r)[1:] for r in usable]
    chosen = max(sorted(set(settings), key=repr), key=lambda s: (settings.count(s), s[0] == "ema"))
    by_step = {r["step"]: r for r in usable if record_key(r)[1:] == chosen}
    steps = sorted(by_step)
    keep = sorted({steps[int(i)] for i in np.round(np.linspace(0, len(steps) - 1, min(max_rows, len(steps))))})
    return [by_step[step] for step in keep]


def write_checkpoint_strip(run_dir: str | Path, records: list[dict[str, Any]],
                           samples: int = STRIP_SAMPLES) -> Path | None:
    """RUN_DIR/eval/samples_by_step.png from the run's result records: the first `samples` samples
    of each evaluated checkpoint (the same seeds and labels at every step), a row per checkpoint;
    None before any samples exist."""
    rows = strip_rows(records)
    if not rows:
        return None
    images, labels, names = [], [], []
    for record in rows:
        with np.load(record["samples"]) as data:
            images.append(data["arr_0"][:samples])
            labels.append(data["arr_1"][:samples])
        names.append(f"step {record['step']}")
    count = min(len(i) for i in images)
    stacked = np.concatenate([i[:count] for i in images])
    image, _ = labelled_grid(stacked, np.concatenate([lab[:count] for lab in labels]),
                             list(range(len(stacked))), count, row_labels=names)
    return save_png(image, eval_dir(run_dir) / STRIP_NAME)
