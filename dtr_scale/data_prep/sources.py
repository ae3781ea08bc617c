"""Sources of labelled images: an ImageFolder tree (or tar archives of it), or images already in memory.

A source is a fixed, sorted listing: `classes`, `keys` (each image's path relative to the source),
`labels`, and `open(i) -> PIL image`. Everything downstream (parts, chunks, sample index) is defined on
positions in this listing, so it must not depend on the filesystem's enumeration order.

ImageFolder layouts accepted, as a directory or as one uncompressed tar holding the same tree:
    ROOT/<class>/**/<image>       torchvision ImageFolder
    ROOT/<class>.tar              a tar of one class's images (ImageNet's ILSVRC2012_img_train.tar holds these)
Labels are the positions of the class names in sorted order, or in `classes` when given (e.g. the
ImageNet synset list), which also catches a missing class folder instead of silently shifting labels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dtr_scale.data_prep.images import DEFAULT_MAX_PIXELS, BadImage, open_image_bytes

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


class SourceError(ValueError):
    """A source that cannot be prepared at all (missing, empty, inconsistent classes); found before any work."""


@dataclass(frozen=True)
class Location:
    """Where an image's bytes are: a whole file (size < 0) or a byte range inside an uncompressed tar."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_tar(path: str, base: int = 0, prefix: str = "", fileobj=None) -> list[tuple[str, Location]]:
    """(member path, location) of every image in an uncompressed tar, descending into tars inside it."""
    found = []
    try:
        tar = tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except tarfile.ReadError as err:
        raise SourceError(f"{path}{'/' + prefix if prefix else ''}: not an uncompressed tar archive ({err}); "
                          "images are read by byte offset, so unpack compressed archives first") from None
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            name = prefix + member.name
            if name.lower().endswith(".tar"):
                inner = tar.extractfile(member)
                found += scan_tar(path, base + member.offset_data, name + "/", fileobj=inner)
            elif is_image_name(name):
                found.append((name, Location(path, base + member.offset_data, member.size)))
    return found


def scan_folder(root: str) -> list[tuple[str, Location]]:
    """(path relative to root, location) of every image under root, inside class tars included."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if name.lower().endswith(".tar"):
                found += scan_tar(path, prefix=rel + "/")
            elif is_image_name(name):
                found.append((rel, Location(path)))
    return found


def class_of(key: str) -> str | None:
    """The class of an image from its relative path: the first path component, a `.tar` suffix dropped."""
    head, sep, _ = key.partition("/")
    if not sep:
        return None  # an image at the top level belongs to no class (ImageFolder ignores it too)
    return head[:-4] if head.lower().endswith(".tar") else head


def empty_class_folders(root: str, found_classes: set[str]) -> list[str]:
    """Class folders (or class tars) directly under a directory root that hold no image: they get no
    label, which the prep reports, because a later image there would shift the labels after it."""
    if not os.path.isdir(root):
        return []
    entries = [n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) or n.lower().endswith(".tar")]
    names = {n[:-4] if n.lower().endswith(".tar") else n for n in entries}
    return sorted(names - found_classes)


def assign_labels(found_classes: set[str], root: str, classes: list[str] | None) -> list[str]:
    if not found_classes:
        raise SourceError(f"no class folders in {root}: expected the ImageFolder layout ROOT/<class>/<image> "
                          "or ROOT/<class>.tar")
    if classes is None:
        return sorted(found_classes)
    missing = [c for c in classes if c not in found_classes]
    extra = sorted(found_classes - set(classes))
    if missing:
        raise SourceError(f"{len(missing)} class folder(s) from the class list are missing or have no images "
                          f"in {root}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; "
                          "restore them (labels are positions in the class list, so a gap would shift them)")
    if extra:
        raise SourceError(f"class folder(s) in {root} that are not in the class list: {', '.join(extra[:10])}; "
                          "remove them or add them to the list")
    return list(classes)


class FolderSource:
    """An ImageFolder directory or tar (see the module docstring)."""

    def __init__(self, root: str, classes: list[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not os.path.exists(root):
            raise SourceError(f"source {root} does not exist")
        found = scan_tar(root) if os.path.isfile(root) else scan_folder(root)
        labelled = [(class_of(key), key, loc) for key, loc in found if class_of(key) is not None]
        self.name = os.path.abspath(root)
        self.classes = assign_labels({c for c, _, _ in labelled}, root, classes)
        self.empty_classes = empty_class_folders(root, {c for c, _, _ in labelled})
        if self.empty_classes:
            log.warning("%d class folder(s) in %s hold no images and get no label: %s; labels are positions among "
                        "the %d classes with images (pass --classes to fix the label order)",
                        len(self.empty_classes), root, ", ".join(self.empty_classes[:10]), len(self.classes))
        label_of = {c: i for i, c in enumerate(self.classes)}
        labelled.sort(key=lambda row: (label_of[row[0]], row[1]))
        if not labelled:
            raise SourceError(f"no images in {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        self.keys = [key for _, key, _ in labelled]
        self.labels = np.array([label_of[c] for c, _, _ in labelled], dtype=np.int64)
        self._locations = [loc for _, _, loc in labelled]
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.keys)

    def open(self, i: int) -> Image.Image:
        try:
            data = self._locations[i].read()
        except OSError as err:  # vanished, unreadable permissions, I/O error of the filesystem
            raise BadImage("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
        return open_image_bytes(data, self.max_pixels)


class ArraySource:
    """Decoded uint8 RGB images in memory [N, H, W, 3], e.g. the embedded digits."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        if len(images) == 0:
            raise SourceError(f"source {name} has no images")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise SourceError(f"source {name}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        self.name, self.images, self.classes = name, images, list(classes)
        self.empty_classes: list[str] = []
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = [f"{name}/{i:06d}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.keys)

    def open(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


def digits_source(size: int = 16) -> ArraySource:
    from dtr_scale.data.digits import DIGITS_NUM_CLASSES, load_digits_images

    images, labels = load_digits_images(size=size)
    return ArraySource("digits", images, labels, [str(c) for c in range(DIGITS_NUM_CLASSES)])


def listing_sha256(source: FolderSource | ArraySource) -> str:
    """Identity of a listing: its classes and every (key, label), in order; image bytes are not read."""
    h = hashlib.sha256()
    h.update("\n".join(source.classes).encode() + b"\0")
    for key, label in zip(source.keys, source.labels.tolist()):
        h.update(f"{key}\t{label}\n".encode())
    return h.hexdigest()
