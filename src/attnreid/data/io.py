"""Reading images and listing dataset folders, on disk or inside a ``.zip``.

A path inside a zip archive is written ``"<zip path>::<member>"``, e.g.
``"/data/Market-1501-v15.09.15.zip::Market-1501-v15.09.15/query/0001_c1s1_001051_00.jpg"``.
:func:`read_image` accepts both kinds. Open :class:`zipfile.ZipFile` handles are cached per
process; the cache is keyed by the process id because DataLoader workers are forked and a
file handle shared across a fork would have its read position moved by the other process.

:class:`Tree` gives the dataset loaders one way to ask "which sub-folders and files are
here" for a real folder (:class:`DirTree`) and for a zip archive (:class:`ZipTree`).
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image, UnidentifiedImageError

from attnreid.errors import DataError
from attnreid.safe_io import check_member_size

ZIP_SEP = "::"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")  # .tif: Occluded-REID's release
# Bounds checked before an image is read or decoded. A re-ID crop is ~10 KB and 128 x 64 px;
# these leave room for whole photos (explain, FeatureExtractor) and stop a "1 GiB JPEG".
MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 50_000_000  # about 7000 x 7000; Pillow's own MAX_IMAGE_PIXELS is 89 M

_zip_handles: Dict[Tuple[int, str], zipfile.ZipFile] = {}
_zip_lock = threading.Lock()


def split_zip_path(path: str) -> Tuple[Optional[str], str]:
    """``"a.zip::m/x.jpg"`` -> ``("a.zip", "m/x.jpg")``; a plain path -> ``(None, path)``."""
    if ZIP_SEP in path:
        archive, member = path.split(ZIP_SEP, 1)
        return archive, member
    return None, path


def _open_zip(archive: str) -> zipfile.ZipFile:
    key = (os.getpid(), archive)
    handle = _zip_handles.get(key)
    if handle is None:
        with _zip_lock:
            handle = _zip_handles.get(key)
            if handle is None:
                try:
                    handle = zipfile.ZipFile(archive)
                except FileNotFoundError:
                    raise DataError(f"zip archive not found: {archive}") from None
                except (zipfile.BadZipFile, OSError) as exc:
                    raise DataError(f"cannot open zip archive {archive}: {exc}; expected a readable .zip file") from None
                _zip_handles[key] = handle
    return handle


def read_bytes(path: str) -> bytes:
    """The raw bytes of a file on disk or of a zip member (``"a.zip::member"``)."""
    archive, member = split_zip_path(str(path))
    if archive is None:
        try:
            if not stat.S_ISREG(os.stat(member).st_mode):  # a FIFO would block the read forever
                raise DataError(f"image {path} is not a regular file; expected a JPEG/PNG image")
            with open(member, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_IMAGE_BYTES:
                    raise DataError(f"image {path} is {size} bytes; attnreid reads images of at most "
                                    f"{MAX_IMAGE_BYTES} bytes")
                return fh.read()
        except FileNotFoundError:
            raise DataError(f"image not found: {path}") from None
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    handle = _open_zip(archive)
    try:
        info = handle.getinfo(member)
        check_member_size(f"image {path}", info, MAX_IMAGE_BYTES)  # the declared size, before reading
        return handle.read(info)
    except KeyError:
        raise DataError(f"image not found: {path} (no such member in the zip archive)") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def read_image(path: str) -> Image.Image:
    """Decode an image (file or zip member) to an RGB :class:`PIL.Image.Image`.

    Raises :class:`DataError` naming the path for a missing, empty or undecodable image.
    """
    data = read_bytes(path)
    if not data:
        raise DataError(f"image {path} is empty (0 bytes); expected a JPEG/PNG image")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {path} is {img.width} x {img.height} pixels; attnreid decodes images of "
                                f"at most {MAX_IMAGE_PIXELS} pixels")
            return img.convert("RGB")
    except Image.DecompressionBombError:  # over twice Pillow's own pixel limit, refused at open
        raise DataError(f"image {path} declares more pixels than Pillow's limit (a decompression bomb?); "
                        f"attnreid decodes images of at most {MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise DataError(f"image {path} cannot be decoded (not a known image format); "
                        f"expected a JPEG/PNG image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow's messages may hold the repr of our in-memory buffer; the path says where instead.
        reason = _OBJECT_REPR.sub("the file", str(exc).split("\n")[0]) or type(exc).__name__
        raise DataError(f"image {path} cannot be decoded ({reason}); expected a JPEG/PNG image") from None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class Tree:
    """A read-only folder tree: a real directory or a zip archive.

    Relative paths use ``/`` and ``""`` is the top. Listings are sorted so that every
    loader returns the same order on every machine.
    """

    location: str

    def is_dir(self, rel: str) -> bool:
        raise NotImplementedError

    def subdirs(self, rel: str) -> List[str]:
        raise NotImplementedError

    def files(self, rel: str) -> List[str]:
        """Names of the plain files directly inside ``rel``."""
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def path(self, rel: str) -> str:
        """The string a loader stores for a file: a real path or ``zip::member``."""
        raise NotImplementedError

    def read_text(self, rel: str) -> str:
        return read_bytes(self.path(rel)).decode("utf-8", errors="replace")

    def find_child(self, rel: str, name: str) -> Optional[str]:
        """The sub-folder of ``rel`` called ``name`` (case-insensitive), as a relative path."""
        wanted = name.lower()
        for child in self.subdirs(rel):
            if child.lower() == wanted:
                return join(rel, child)
        return None


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class DirTree(Tree):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.location = str(self.root)

    def _abs(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def is_dir(self, rel: str) -> bool:
        return self._abs(rel).is_dir()

    def subdirs(self, rel: str) -> List[str]:
        try:
            with os.scandir(self._abs(rel)) as it:
                return sorted(e.name for e in it if e.is_dir())
        except OSError:
            return []

    def files(self, rel: str) -> List[str]:
        try:
            with os.scandir(self._abs(rel)) as it:
                return sorted(e.name for e in it if e.is_file())
        except OSError:
            return []

    def size(self, rel: str) -> int:
        try:
            return self._abs(rel).stat().st_size
        except OSError:
            return -1

    def path(self, rel: str) -> str:
        return str(self._abs(rel))


class ZipTree(Tree):
    """A zip archive seen as a folder tree, built once from its member list."""

    def __init__(self, archive: str | Path):
        self.archive = str(archive)
        self.location = self.archive
        handle = _open_zip(self.archive)
        self._files: Dict[str, Dict[str, int]] = {}
        self._dirs: Dict[str, set] = {"": set()}
        for info in handle.infolist():
            name = info.filename.strip("/")
            if not name:
                continue
            parts = name.split("/")
            dir_parts = parts if info.is_dir() else parts[:-1]
            for i in range(len(dir_parts)):
                parent = "/".join(dir_parts[:i])
                self._dirs.setdefault(parent, set()).add(dir_parts[i])
                self._dirs.setdefault("/".join(dir_parts[: i + 1]), set())
            if not info.is_dir():
                self._files.setdefault("/".join(parts[:-1]), {})[parts[-1]] = info.file_size

    def is_dir(self, rel: str) -> bool:
        return rel.strip("/") in self._dirs

    def subdirs(self, rel: str) -> List[str]:
        return sorted(self._dirs.get(rel.strip("/"), ()))

    def files(self, rel: str) -> List[str]:
        return sorted(self._files.get(rel.strip("/"), {}))

    def size(self, rel: str) -> int:
        folder, _, name = rel.strip("/").rpartition("/")
        return self._files.get(folder, {}).get(name, -1)

    def path(self, rel: str) -> str:
        return f"{self.archive}{ZIP_SEP}{rel.strip('/')}"


def open_trees(root: str | Path, zip_hints: Tuple[str, ...] = ()) -> List[Tree]:
    """The trees a dataset may live in, given the data root the user named.

    ``root`` may be a folder or a ``.zip``. For a folder, the folder itself comes first,
    then every ``.zip`` directly inside it whose file name contains one of ``zip_hints``
    (compared lower-case with ``-``/``_`` removed), so that unrelated large archives in a
    shared data root are not opened.
    """
    root = Path(root).expanduser()
    if root.is_file():
        if zipfile.is_zipfile(root):
            return [ZipTree(root)]
        raise DataError(f"data root {root} is a file but not a .zip archive; expected a folder or a .zip")
    if not root.is_dir():
        raise DataError(f"data root not found: {root}; expected an existing folder or .zip file")
    trees: List[Tree] = [DirTree(root)]
    hints = tuple(_squash(h) for h in zip_hints)
    for entry in sorted(root.iterdir()):
        if entry.suffix.lower() == ".zip" and entry.is_file() and any(h in _squash(entry.stem) for h in hints):
            trees.append(ZipTree(entry))
    return trees


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")
