"""Image checks shared by every importer: header bounds, a full decode, RGB normalisation, storage.

Every image an importer meets goes through :class:`ImageIngest`: its header size is checked before
any pixel is decoded (so a 20000x20000 "decompression bomb" costs a header read), the image is then
decoded in full (so truncated files are caught here, not at training time), and it is stored in the
content-addressed store either as its original bytes (RGB JPEG/PNG/WEBP, what training reads) or,
for any other mode or format, converted once to RGB and stored as PNG.

Image paths read from an input file go through :func:`resolve_inside`, which refuses absolute paths,
``..`` escapes and symlinks that resolve outside the input's folder before anything is opened.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prefalign.data.importers.errors import RowRejected
from prefalign.data.schema import ImageStore

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# Stored as they are when the pixels are already RGB: training reads these directly.
PASSTHROUGH_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Only these parsers are tried: fewer decoders exposed to untrusted bytes, and nothing exotic to convert.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# A file this large is refused before it is read into memory (no real preference image comes close).
MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024
# Decode results are remembered by the sha of the raw bytes: Pick-a-Pic repeats an image across the
# pairs of one prompt, and a repeat should not cost a second decode. Bounded so memory stays flat.
DECODE_CACHE_ENTRIES = 50_000
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class IndexedImageStore(ImageStore):
    """An :class:`ImageStore` that answers "is this sha stored?" from memory.

    The base class globs the bucket folder on every lookup, which grows with the store; a bulk import
    asks once per image, so this scans the store once and then tracks what it adds.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._known: set[str] = set(self.index())

    def __contains__(self, sha: object) -> bool:
        return sha in self._known

    def put_bytes(self, data: bytes, ext: str) -> str:
        """Store encoded image bytes (see :meth:`ImageStore.put_bytes`) and remember their sha."""
        sha = super().put_bytes(data, ext)
        self._known.add(sha)
        return sha


class ImageIngest:
    """Checks, normalises and stores images; raises :class:`RowRejected` for any it cannot accept.

    Args:
        store: Where accepted images go.
        min_side: Smallest accepted width and height in pixels (``validation.min_image_side``).
        max_side: Largest accepted width and height (``validation.max_image_side``); larger headers
            are refused without decoding.
    """

    def __init__(self, store: ImageStore, *, min_side: int, max_side: int) -> None:
        self.store = store
        self.min_side = min_side
        self.max_side = max_side
        self._outcomes: OrderedDict[str, str | RowRejected] = OrderedDict()

    def put(self, data: object, what: str) -> str:
        """Check and store one encoded image; returns the sha of the stored bytes.

        Args:
            data: The encoded bytes (anything else is rejected as missing).
            what: Where the image came from (``jpg_0``, ``image_path[2]``), for the reason text.

        Raises:
            RowRejected: missing, unreadable, too small or too large (decompression bomb guard).
        """
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise RowRejected("unreadable image", f"{what} is missing or empty")
        data = bytes(data)
        raw_sha = hashlib.sha256(data).hexdigest()
        outcome = self._outcomes.get(raw_sha)
        if outcome is None:
            try:
                outcome = self._check_and_store(data)
            except RowRejected as err:
                outcome = err
            self._remember(raw_sha, outcome)
        if isinstance(outcome, RowRejected):
            raise RowRejected(outcome.category, f"{what} {outcome.detail}")
        return outcome

    def put_file(self, path: Path, what: str) -> str:
        """Read, check and store an image file (already known to lie inside the input folder)."""
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_FILE_BYTES:
                raise RowRejected("image too large", f"{what} file is {size} bytes (limit {MAX_IMAGE_FILE_BYTES})")
            data = path.read_bytes()
        except FileNotFoundError:
            raise RowRejected("missing image file", f"{what} {path} does not exist") from None
        except OSError as err:  # a folder, no permission, an I/O error: this file, not the import
            raise RowRejected("unreadable image", f"{what} {path} cannot be read: {err.strerror or err}") from None
        return self.put(data, what)

    def _remember(self, raw_sha: str, outcome: str | RowRejected) -> None:
        self._outcomes[raw_sha] = outcome
        if len(self._outcomes) > DECODE_CACHE_ENTRIES:
            self._outcomes.popitem(last=False)

    def _check_and_store(self, data: bytes) -> str:
        decoded = self._decode(data)
        # Storing is outside the decode's error handling: a full disk must stop the import, not
        # quarantine every image that follows as "unreadable".
        if isinstance(decoded, str):
            return self.store.put_bytes(data, decoded)
        return self.store.put_array(decoded)

    def _decode(self, data: bytes) -> str | np.ndarray:
        """Check and fully decode ``data``.

        Returns:
            The extension to store the original bytes under (RGB JPEG/PNG/WEBP), or else the RGB
            pixels to store as PNG.

        Raises:
            RowRejected: too large (checked on the header, before decoding), too small, or undecodable.
        """
        from PIL import Image

        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:  # reads the header only
                    self._check_size(*img.size)
                    img.load()
                    ext = PASSTHROUGH_EXTENSIONS.get(img.format or "")
                    return ext if ext is not None and img.mode == "RGB" else to_rgb_array(img)
            except RowRejected:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise RowRejected("image too large", f"refused by Pillow's decompression bomb guard: {err}") from None
            except Image.UnidentifiedImageError:
                raise RowRejected(
                    "unreadable image", f"is not an image in a known format ({', '.join(ACCEPTED_FORMATS)})"
                ) from None
            except Exception as err:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ...)
                raise RowRejected("unreadable image", f"does not decode: {_stable_message(err)}") from None

    def _check_size(self, width: int, height: int) -> None:
        if max(width, height) > self.max_side:
            raise RowRejected(
                "image too large",
                f"header claims {width}x{height} px, above validation.max_image_side={self.max_side} "
                "(decompression bomb guard: not decoded)",
            )
        if min(width, height) < self.min_side:
            raise RowRejected(
                "image too small", f"is {width}x{height} px, below validation.min_image_side={self.min_side}"
            )


def _stable_message(err: Exception) -> str:
    """The error as text without object addresses, so the same bad row always gets the same reason
    (identical quarantine rows are what re-imports de-duplicate)."""
    return _ADDRESS.sub("", f"{type(err).__name__}: {err}")


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image as a uint8 ``(H, W, 3)`` RGB array.

    Transparent images are composited over white rather than having their alpha dropped: dropping it
    would reveal whatever colour the invisible pixels happen to hold, which no annotator ever saw.
    """
    from PIL import Image

    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def resolve_inside(base_dir: Path, relative: object, what: str) -> Path:
    """The file ``relative`` names inside ``base_dir``, or :class:`RowRejected` if it could lie elsewhere.

    Nothing is opened here: absolute paths, paths whose ``..`` parts leave ``base_dir`` and paths
    that resolve (through symlinks) outside ``base_dir`` are refused by name alone.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise RowRejected("invalid record", f"{what} is not a non-empty path string: {relative!r}")
    if "\x00" in relative:
        raise RowRejected("unsafe image path", f"{what} {relative!r} contains a NUL byte")
    if os.path.isabs(relative) or relative.startswith("\\"):
        raise RowRejected("unsafe image path", f"{what} {relative!r} is absolute; paths must be relative")
    root = base_dir.resolve()
    lexical = Path(os.path.normpath(root / relative))
    if not lexical.is_relative_to(root):
        raise RowRejected("unsafe image path", f"{what} {relative!r} escapes the input folder {root}")
    real = lexical.resolve()
    if not real.is_relative_to(root):
        raise RowRejected(
            "unsafe image path", f"{what} {relative!r} is a symlink resolving outside the input folder {root}"
        )
    return real
