"""RUN_DIR/routing.png: which channels each timestep uses, as the model holds it.

A heat map with one row per shown timestep (t = 0 at the top) and one column per channel,
drawn pixel for pixel (every cell is a cell_w x cell_h block of one colour, no resampling), so
the picture can be read back exactly: lit = the channel is in the timestep's window. For DTR a
few timesteps are marked with their window's start s_t and the active width C_beta; R-TR's
per-block masks are drawn as small multiples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dtr_scale.io import atomic_write

ROUTING_PNG = "routing.png"
LIT = (250, 200, 40)  # the channel is active for this timestep
DARK = (40, 40, 80)
PAPER = (255, 255, 255)
INK = (0, 0, 0)
MARKS = 5  # timesteps marked with their window (t = 0, ..., T - 1)
HEATMAP_WIDTH, HEATMAP_ROWS = 768, 200  # about this many pixels wide, at most this many timesteps shown
PANEL_WIDTH, PANEL_ROWS, PANEL_COLUMNS = 192, 64, 4  # R-TR small multiples
MARGIN = {"left": 64, "top": 36, "right": 210, "bottom": 28, "gap": 26}


@dataclass(frozen=True)
class Placement:
    """Where one mask table sits in the picture: row r, channel c is the cell_w x cell_h block
    at (left + c * cell_w, top + r * cell_h), showing timestep timesteps[r]."""

    table: int
    left: int
    top: int
    cell_w: int
    cell_h: int
    timesteps: tuple[int, ...]


def shown_timesteps(num_timesteps: int, rows: int) -> np.ndarray:
    """Up to `rows` evenly spaced timesteps, always 0 and T - 1."""
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, min(rows, num_timesteps))).astype(np.int64))


def mask_pixels(table: np.ndarray, timesteps: np.ndarray, cell_w: int, cell_h: int) -> np.ndarray:
    """uint8 [rows * cell_h, C * cell_w, 3]: LIT where table[t, c], DARK elsewhere."""
    lit = np.repeat(np.repeat(np.asarray(table, bool)[timesteps], cell_h, axis=0), cell_w, axis=1)
    return np.where(lit[..., None], np.array(LIT, np.uint8), np.array(DARK, np.uint8))


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _window(row: np.ndarray) -> tuple[int, int]:
    """(start, width) of a row's active channels, read from the mask itself."""
    active = np.flatnonzero(row)
    return (int(active[0]), len(active)) if len(active) else (0, 0)


def draw_dtr(table: np.ndarray, title: str) -> tuple[Image.Image, Placement]:
    """One heat map of a [T, C] table with MARKS timesteps labelled by their window."""
    num_timesteps, channels = table.shape
    cell_w = max(1, HEATMAP_WIDTH // channels)
    timesteps = shown_timesteps(num_timesteps, HEATMAP_ROWS)
    cell_h = max(1, 2 * HEATMAP_ROWS // len(timesteps))
    pixels = mask_pixels(table, timesteps, cell_w, cell_h)
    m = MARGIN
    image = Image.new("RGB", (m["left"] + pixels.shape[1] + m["right"], m["top"] + pixels.shape[0] + m["bottom"]),
                      PAPER)
    image.paste(Image.fromarray(pixels), (m["left"], m["top"]))
    draw = ImageDraw.Draw(image)
    draw.text((m["left"], 8), title, fill=INK, font=_font(14))
    right = m["left"] + pixels.shape[1]
    for row in np.unique(np.round(np.linspace(0, len(timesteps) - 1, MARKS)).astype(int)):
        t = int(timesteps[row])
        y = m["top"] + row * cell_h + cell_h // 2
        start, width = _window(table[t])
        draw.line([(m["left"] - 6, y), (m["left"] - 2, y)], fill=INK)
        draw.text((4, y - 7), f"t={t}", fill=INK, font=_font())
        draw.line([(right + 2, y), (right + 6, y)], fill=INK)
        draw.text((right + 10, y - 7), f"start {start}, width {width}", fill=INK, font=_font())
    bottom = m["top"] + pixels.shape[0] + 6
    draw.text((m["left"], bottom), "channel 0", fill=INK, font=_font())
    last = f"{channels - 1}"
    draw.text((right - draw.textlength(last, font=_font()), bottom), last, fill=INK, font=_font())
    return image, Placement(0, m["left"], m["top"], cell_w, cell_h, tuple(int(t) for t in timesteps))


def draw_blocks(tables: np.ndarray, title: str) -> tuple[Image.Image, list[Placement]]:
    """Small multiples: one heat map per block's [T, C] table, PANEL_COLUMNS to a row."""
    depth, num_timesteps, channels = tables.shape
    cell_w = max(1, PANEL_WIDTH // channels)
    timesteps = shown_timesteps(num_timesteps, PANEL_ROWS)
    cell_h = max(1, PANEL_ROWS // len(timesteps))
    width, height = channels * cell_w, len(timesteps) * cell_h
    gap, columns = MARGIN["gap"], min(PANEL_COLUMNS, depth)
    rows = -(-depth // columns)
    image = Image.new("RGB", (gap + columns * (width + gap), MARGIN["top"] + rows * (height + gap)), PAPER)
    draw = ImageDraw.Draw(image)
    draw.text((gap, 8), title, fill=INK, font=_font(14))
    placements = []
    for block in range(depth):
        left = gap + (block % columns) * (width + gap)
        top = MARGIN["top"] + (block // columns) * (height + gap) + 14
        image.paste(Image.fromarray(mask_pixels(tables[block], timesteps, cell_w, cell_h)), (left, top))
        draw.text((left, top - 14), f"block {block}", fill=INK, font=_font(11))
        placements.append(Placement(block, left, top, cell_w, cell_h, tuple(int(t) for t in timesteps)))
    return image, placements


def routing_title(kind: str, tables: np.ndarray, beta: float, alpha: float) -> str:
    channels = tables.shape[-1]
    width = _window(tables[0, 0])[1]
    if kind == "dtr":
        return (f"DTR mask: timestep (rows, t=0 at the top) x channel; beta {beta}, alpha {alpha}, "
                f"C {channels}, active C_beta {width}")
    return f"R-TR masks per block: a random {width} of {channels} channels per timestep; rows t, columns channel"


def draw_routing(tables: np.ndarray, kind: str, beta: float, alpha: float) -> tuple[Image.Image, list[Placement]]:
    """The picture of a model's routing tables [tables, T, C] (DTR: one shared table)."""
    tables = np.asarray(tables, bool)
    if kind == "dtr":
        image, placement = draw_dtr(tables[0], routing_title(kind, tables, beta, alpha))
        return image, [placement]
    return draw_blocks(tables, routing_title(kind, tables, beta, alpha))


def write_routing_png(path: str | Path, tables: np.ndarray, kind: str, beta: float, alpha: float) -> Path:
    """Draw the routing tables into `path` (atomically) and return it."""
    image, _ = draw_routing(tables, kind, beta, alpha)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return Path(path)
