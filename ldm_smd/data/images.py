"""Image folders, CompVis-style file lists and CelebA-HQ.

Every item goes through the same steps (:class:`EncodedImageDataset`): decode with PIL and convert
to 8-bit RGB, or to 8-bit grayscale with ``channels: 1`` (:mod:`ldm_smd.data.decode` documents
each conversion), cut the largest square (``crop: center`` as CompVis, or ``random``), resize it
to ``size`` with PIL, flip it left-right with probability ``flip_p``, and return
``{"image": float32 (channels, size, size) in [-1, 1]}`` (plus ``"path"`` when ``return_path``
is set). Random crops and flips draw from torch's global
generator, which :class:`~ldm_smd.data.datamodule.ImageDataModule` seeds in each worker; for
augmentation drawn from an explicit seeded generator use the DataModule's ``batch_augment``.

Bad inputs are errors that name the thing at fault: a missing or empty folder, a missing list,
a list naming a missing file (checked when the dataset is built; the first missing path is named),
and an undecodable image at read time. With ``skip_corrupt: true`` an undecodable image is
replaced by the next readable one, with a warning that names the file and counts the skips.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, TypedDict

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # Python 3.10
    from typing_extensions import Unpack

import torch
from torch.utils.data import Dataset

from ldm_smd.data.decode import (
    ALPHA_MODES,
    CHANNELS,
    CROP_MODES,
    IMAGE_EXTENSIONS,
    INTERPOLATIONS,
    CorruptImageError,
    check_choice,
    crop_square,
    decode_image,
    resize_square,
    to_tensor,
)
from ldm_smd.errors import DataError


class EncodedImageDataset(Dataset):
    """Base class: items are encoded images fetched by :meth:`_source`; see the module docstring.

    Args:
        size: output height and width; ``None`` keeps the square crop's own size.
        crop: ``"center"`` or ``"random"`` square crop of non-square images.
        flip_p: probability of a left-right flip per item (CompVis used 0.5 for training sets).
        interpolation: PIL resampling for the resize: bicubic (CompVis' default), lanczos,
            bilinear, box or nearest.
        alpha: what happens to transparency: ``"white"`` / ``"black"`` composite, or ``"drop"``.
        channels: 3 (RGB) or 1 (grayscale: the luma of the RGB image).
        skip_corrupt: replace undecodable images by the next readable one (with a warning)
            instead of raising.
        return_path: add the item's file path (or LMDB key) as ``"path"``.
    """

    def __init__(
        self,
        *,
        size: int | None = 256,
        crop: str = "center",
        flip_p: float = 0.0,
        interpolation: str = "bicubic",
        alpha: str = "white",
        channels: int = 3,
        skip_corrupt: bool = False,
        return_path: bool = False,
    ) -> None:
        owner = type(self).__name__
        if size is not None and size < 1:
            raise ValueError(f"{owner}: size={size} must be positive")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"{owner}: flip_p={flip_p} is not a probability in [0, 1]")
        check_choice(owner, "crop", crop, CROP_MODES)
        check_choice(owner, "interpolation", interpolation, INTERPOLATIONS)
        check_choice(owner, "alpha", alpha, ALPHA_MODES)
        if channels not in CHANNELS:
            raise ValueError(f"{owner}: channels={channels} is not 1 (grayscale) or 3 (RGB)")
        self.size = size
        self.crop = crop
        self.flip_p = float(flip_p)
        self.interpolation = interpolation
        self.alpha = alpha
        self.channels = int(channels)
        self.skip_corrupt = skip_corrupt
        self.return_path = return_path
        self.num_skipped = 0  # undecodable items skipped in this process (per worker)
        self.num_upscaled = 0  # items smaller than size, enlarged (per worker)

    def __len__(self) -> int:
        raise NotImplementedError

    def _source(self, index: int) -> tuple[str | bytes, str]:
        """(file path or encoded bytes, name for messages) of item ``index``."""
        raise NotImplementedError

    def load(self, index: int) -> dict[str, Any]:
        """Item ``index`` without skipping: raises CorruptImageError naming the file."""
        source, name = self._source(index)
        img = decode_image(source, name=name, alpha=self.alpha, channels=self.channels)
        img = crop_square(img, mode=self.crop)
        if self.size is not None and img.size[0] < self.size:
            self._note_upscaled(name, img.size[0])
        img = resize_square(img, self.size, interpolation=self.interpolation)
        image = to_tensor(img)
        if self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            image = image.flip(-1)
        item: dict[str, Any] = {"image": image}
        if self.return_path:
            item["path"] = name
        return item

    def _note_upscaled(self, name: str, side: int) -> None:
        """Say once per dataset (and process) that an image smaller than ``size`` is enlarged,
        naming the first: a 1x1 picture becomes a flat square without a word otherwise."""
        self.num_upscaled += 1
        if self.num_upscaled == 1:
            warnings.warn(
                f"{type(self).__name__}: {name} is {side}x{side} pixels after the square crop, "
                f"smaller than size={self.size}, and is enlarged {self.size / side:.3g} times "
                "(the first such image; later ones are counted in num_upscaled, not named)",
                stacklevel=3,
            )

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range (length {n})")
        if not self.skip_corrupt:
            return self.load(index)
        for step in range(n):
            try:
                return self.load((index + step) % n)
            except CorruptImageError as exc:
                self.num_skipped += 1
                warnings.warn(
                    f"skip_corrupt: skipped {exc} ({self.num_skipped} skipped so far in this "
                    "process)",
                    stacklevel=2,
                )
        raise CorruptImageError(f"{type(self).__name__}: none of the {n} images can be decoded")


def scan_folder(root: str | os.PathLike[str]) -> list[str]:
    """Image files under ``root`` (recursive, sorted, hidden entries skipped), relative to it."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    if not found:
        raise DataError(
            f"image folder {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "recursively)"
        )
    return sorted(found)


def read_file_list(list_file: str | os.PathLike[str]) -> list[str]:
    """Entries of a CompVis-style list: a relative path per line; blank and ``#`` lines skipped."""
    path = Path(list_file)
    if not path.is_file():
        raise FileNotFoundError(f"file list not found: {path}")
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line)
    if not entries:
        raise ValueError(f"file list {path} names no files")
    return entries


def find_listed(root: str | os.PathLike[str], entries: list[str], *, match_stem: bool = False
                ) -> tuple[list[str], list[str]]:
    """(existing paths, missing paths) of list entries under ``root``, in list order.

    With ``match_stem`` an entry that does not exist is also looked for with each image extension
    in place of its own (a list of ``00001.npy`` or ``00001`` finds ``00001.png``).
    """
    root = Path(root)
    found: list[str] = []
    missing: list[str] = []
    for entry in entries:
        path = root / entry
        if match_stem and not path.is_file():
            stem = path.with_suffix("") if path.suffix else path
            candidates = [stem.with_name(stem.name + ext) for ext in IMAGE_EXTENSIONS]
            path = next((c for c in candidates if c.is_file()), path)
        (found if path.is_file() else missing).append(str(path))
    return found, missing


def resolve_list(root: str | os.PathLike[str], entries: list[str], *, list_file: str,
                 match_stem: bool = False) -> list[str]:
    """Paths of the listed files under ``root``; raises naming the first missing one."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (root of list {list_file})")
    found, missing = find_listed(root, entries, match_stem=match_stem)
    if missing:
        raise FileNotFoundError(
            f"file list {list_file} names {len(missing)} file(s) missing under {root}; "
            f"first missing: {missing[0]}"
        )
    return found


class ImageOptions(TypedDict, total=False):
    """The decoding options of every image dataset: the keyword arguments of
    :class:`EncodedImageDataset` (documented there), which the datasets below pass on."""

    size: int | None
    crop: str
    flip_p: float
    interpolation: str
    alpha: str
    channels: int
    skip_corrupt: bool
    return_path: bool


class ImageFolder(EncodedImageDataset):
    """A folder of PNG / JPEG / WebP (and BMP, TIFF) images, or the files a list names in it.

    Without ``file_list`` every image under ``root`` is used (recursively, sorted by path).
    With it, the list's lines are paths relative to ``root`` (CompVis' LSUN lists), in list order.

    Args:
        root: the folder.
        file_list: a text file of paths relative to ``root``, one per line; ``None`` scans.
        options: the decoding options (:class:`ImageOptions`: size, crop, flip_p,
            interpolation, alpha, channels, skip_corrupt, return_path; see
            :class:`EncodedImageDataset`).
    """

    _match_stem = False

    def __init__(self, *, root: str, file_list: str | None = None,
                 **options: Unpack[ImageOptions]) -> None:
        super().__init__(**options)
        self.root = str(root)
        self.file_list = file_list
        if file_list is None:
            self.paths = [os.path.join(self.root, p) for p in scan_folder(self.root)]
        else:
            entries = read_file_list(file_list)
            self.paths = resolve_list(self.root, entries, list_file=str(file_list),
                                      match_stem=self._match_stem)

    def __len__(self) -> int:
        return len(self.paths)

    def _source(self, index: int) -> tuple[str, str]:
        return self.paths[index], self.paths[index]


class CelebAHQ(ImageFolder):
    """CelebA-HQ as a folder of PNG or JPEG images with a train or validation split list.

    The split list names one image per line relative to ``root``; an entry whose file does not
    exist is also matched by its stem with any image extension, so CompVis' lists of
    ``imgHQ00000.npy`` names find ``imgHQ00000.png``. Conventional places:
    ``data/celebahq/`` with ``data/celebahq/celebahqtrain.txt`` and
    ``data/celebahq/celebahqvalidation.txt``; ``scripts/prepare_celebahq.py`` checks a copy.

    Args:
        root: the image folder.
        split_file: the split list (train or validation).
        options: the decoding options (:class:`ImageOptions`; CelebA-HQ is 1024 x 1024, the
            paper trains at ``size`` 256).
    """

    _match_stem = True

    def __init__(self, *, root: str, split_file: str, **options: Unpack[ImageOptions]) -> None:
        super().__init__(root=root, file_list=split_file, **options)
