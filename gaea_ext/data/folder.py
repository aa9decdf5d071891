"""ImageFolder trees: ``<split>/<class>/<image>``, class index = position in sorted class names.

Images are decoded with PIL, converted to RGB and resized to a square ``size`` x ``size`` with
PIL's antialiased bilinear filter (the whole image, aspect ratio not kept -- as in the
downsampled-ImageNet datasets). Large JPEGs are decoded at reduced scale first (PIL ``draft``).
"""
from __future__ import annotations

import io

import numpy as np
import torch

from .errors import DataError
from .sources import join

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan(src, split_dir: str, classes: list[str], *, allow_empty_classes: bool) -> tuple[list[str], list[int]]:
    """Relative paths of the images under ``split_dir`` and their class indices, sorted by
    (class, file name). Class folders not in ``classes`` are an error."""
    present = src.dirs(split_dir)
    if not present:
        raise DataError(f"no class folders in {src.describe(split_dir)} (expected <class>/<image> below it)")
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataError(f"class folder(s) {', '.join(unknown)} in {src.describe(split_dir)} are not among "
                        f"the {len(classes)} training classes")
    rels: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = [join(split_dir, name, f) for f in src.files(join(split_dir, name)) if is_image(f)]
        if not found and not allow_empty_classes and name in present:
            raise DataError(f"class folder {src.describe(join(split_dir, name))} has no images")
        rels += found
        labels += [label] * len(found)
    if not rels:
        raise DataError(f"no images in {src.describe(split_dir)} (looked for {'/'.join(IMAGE_EXTENSIONS)})")
    return rels, labels


def decode_images(src, rels: list[str], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] from the image files ``rels``."""
    from PIL import Image

    out = np.empty((len(rels), size, size, 3), dtype=np.uint8)
    for i, rel in enumerate(rels):
        try:
            with Image.open(io.BytesIO(src.read(rel))) as im:
                if im.format == "JPEG" and min(im.size) > 2 * size:
                    im.draft("RGB", (size, size))
                if im.mode != "RGB":
                    im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for truncated/corrupt files
            raise DataError(f"cannot decode image {src.describe(rel)}: {type(e).__name__}: {e}") from e
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
