"""Image files for vision-language routing: which files a folder holds, checked and opened one at a time.

Files are listed by name (sorted) and only opened when their batch is built, so a folder of any size streams.
A file is checked by reading its header (``PIL.Image.verify``) before any weights load; decoding waits for its batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from moe_inspect.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise UserError("Routing images needs Pillow; install it with `pip install pillow`.") from None
    return Image


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder`` (by suffix, sorted by name); refuses a missing or empty folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"No image folder at '{folder}'.")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"'{folder}' holds no image files ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}).")
    return files


def _existing(image: str | Path) -> Path:
    path = Path(image).expanduser()
    if not path.is_file():
        raise UserError(f"No image file at '{image}'.")
    return path


def check_image(image: str | Path | Any) -> None:
    """Refuse a path that is missing or not an image PIL can read (header only; a PIL image passes)."""
    if not isinstance(image, str | Path):
        return
    path = _existing(image)
    pil = _pil()
    try:
        with pil.open(path) as opened:
            opened.verify()
    except Exception:  # PIL raises many kinds (UnidentifiedImageError, SyntaxError, OSError) for one cause
        raise UserError(f"'{image}' is not an image file Pillow can read.") from None


def open_image(image: str | Path | Any) -> Any:
    """An RGB PIL image from a path or a PIL image (converted); a path is opened once, its errors worded as
    ``check_image`` words them (the CLI has verified every file before the weights load)."""
    if isinstance(image, str | Path):
        path = _existing(image)
        pil = _pil()
        try:
            with pil.open(path) as opened:
                return opened.convert("RGB")
        except Exception:  # as in check_image: one cause, many exception kinds
            raise UserError(f"'{image}' is not an image file Pillow can read.") from None
    convert = getattr(image, "convert", None)
    if not callable(convert):
        raise UserError(f"An image must be a file path or a PIL image, not {type(image).__name__}.")
    return convert("RGB")


def image_chunks(files: Sequence[Path], size: int) -> Iterator[list[Path]]:
    """``files`` in groups of ``size`` (the last may be shorter): only one group is ever opened at a time."""
    for start in range(0, len(files), size):
        yield list(files[start : start + size])
