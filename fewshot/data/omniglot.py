"""Omniglot (Lake et al. 2015) for few-shot learning: 105×105 binary stroke images, 20 drawers per
character, resized to 28×28 (Vinyals et al. 2016), strokes bright (1) on a dark (0) background.

* :func:`load_omniglot_small`, the offline protocol of this project: the two real small background
  sets ``images_background_small1.zip`` / ``..._small2.zip`` (242 distinct characters in 8 alphabets;
  Greek and Latin are in both zips with identical images and are kept once), split by alphabet —
  :data:`SMALL_SPLIT`: 5 alphabets train (163 characters, ×4 rotations), 1 validation (22), 2 test
  (57), so that 20-way episodes exist in every split.
* :func:`load_omniglot`, the standard protocol: ``images_background`` and ``images_evaluation``
  (folders or the official zips) with the Vinyals et al. character split (1028/172/423 characters,
  files ``{train,val,test}.json`` of ``fewshot_splits/omniglot``), rotations ×4 for training classes.

Rotations are extra *classes* for the training split only (validation and test classes are never
rotated).
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from l2l_zoo.tasks.data import DataNotFoundError, resolve_data_dirs

from .episodes import FewShotDataError, FewShotSplit

__all__ = ["SMALL_SPLIT", "load_omniglot_small", "load_omniglot"]

SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
SMALL_SPLIT = {"train": ("Balinese", "Greek", "Japanese_(katakana)", "Latin", "Sanskrit"),
               "val": ("Early_Aramaic",),
               "test": ("Korean", "Tagalog")}


def _decode(data: bytes, size: int, where: str) -> np.ndarray:
    from PIL import Image
    try:
        im = Image.open(io.BytesIO(data)).convert("L")
    except Exception as e:  # noqa: BLE001 - any decoder failure is a malformed file
        raise FewShotDataError(f"{where}: not a readable PNG image ({e})") from None
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)
    return 255 - np.asarray(im, dtype=np.uint8)  # strokes bright on dark


def _data_dirs(data_dir, what: str) -> list[Path]:
    try:
        return resolve_data_dirs(data_dir)
    except FewShotDataError:
        raise
    except DataNotFoundError as e:  # a data_dir / $L2L_ZOO_DATA that does not exist
        raise FewShotDataError(f"{what} not found: {e}") from None


def _find(data_dir, names, what: str, layout: str) -> tuple[Path, list[Path]]:
    dirs = _data_dirs(data_dir, what)
    for d in dirs:
        for sub in ("omniglot", ""):
            base = d / sub if sub else d
            found = [base / n for n in names]
            if all(p.exists() for p in found):
                return base, found
    raise FewShotDataError(f"{what} not found: need {layout}, looked in {[str(d) for d in dirs]} and their "
                           "omniglot/ sub-folders; pass data_dir= or set L2L_ZOO_DATA")


def _read_zip_characters(path: Path, size: int) -> dict[tuple[str, str], list[np.ndarray]]:
    """{(alphabet, character): [images]} of one Omniglot zip (``<root>/<alphabet>/<character>/*.png``)."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FewShotDataError(f"{str(path)!r} is not a readable zip file ({e})") from None
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    with z:
        for n in sorted(z.namelist()):
            parts = n.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                out.setdefault((parts[1], parts[2]), []).append(_decode(z.read(n), size, f"{path}:{n}"))
    if not out:
        raise FewShotDataError(f"{str(path)!r} holds no <root>/<alphabet>/<character>/*.png images")
    return out


def _read_folder_characters(root: Path, size: int) -> dict[tuple[str, str], list[np.ndarray]]:
    out = {}
    for a in sorted(p for p in root.iterdir() if p.is_dir()):
        for c in sorted(p for p in a.iterdir() if p.is_dir()):
            out[(a.name, c.name)] = [_decode(f.read_bytes(), size, str(f)) for f in sorted(c.glob("*.png"))]
    if not out:
        raise FewShotDataError(f"{str(root)!r} holds no <alphabet>/<character>/*.png images")
    return out


def _split(name: str, chars: dict, keys: list[tuple[str, str]], note: str) -> FewShotSplit:
    imgs, labels = [], []
    for c, k in enumerate(keys):
        ims = chars[k]
        imgs += ims
        labels += [c] * len(ims)
    x = torch.from_numpy(np.stack(imgs)).unsqueeze(1)
    return FewShotSplit(name, x, torch.tensor(labels), [f"{a}/{c}" for a, c in keys], note=note)


def _finish(splits: dict[str, FewShotSplit], rotations: bool) -> dict[str, FewShotSplit]:
    tr = splits["train"]
    mean = float(tr.images.float().mean() / 255.0)
    std = float(tr.images.float().div(255.0).std())
    out = {}
    for k, s in splits.items():
        s = FewShotSplit(s.name, s.images, s.labels, s.class_names, mean=[mean], std=[std], note=s.note)
        out[k] = s.with_rotations() if (k == "train" and rotations) else s
    return out


def load_omniglot_small(data_dir=None, *, image_size: int = 28, rotations: bool = True,
                        split: dict | None = None) -> dict[str, FewShotSplit]:
    """The omniglot-small protocol (module docstring): ``{"train", "val", "test"}`` splits;
    ``split`` maps each split to alphabet names (default :data:`SMALL_SPLIT`)."""
    split = split or SMALL_SPLIT
    base, zips = _find(data_dir, SMALL_ZIPS, "Omniglot small background sets",
                       f"{' and '.join(SMALL_ZIPS)}")
    chars: dict = {}
    for z in zips:
        for k, ims in _read_zip_characters(z, image_size).items():
            chars.setdefault(k, ims)  # Greek and Latin are in both zips, identical: keep one copy
    alphabets = sorted({a for a, _ in chars})
    named = [a for s in split.values() for a in s]
    unknown = sorted(set(named) - set(alphabets))
    if unknown or len(named) != len(set(named)):
        raise ValueError(f"split must assign distinct alphabets from {alphabets}, got {split}")
    out = {}
    for name, als in split.items():
        keys = sorted(k for k in chars if k[0] in als)
        out[name] = _split(name, chars, keys, f"omniglot-small {name}: alphabets {list(als)}, {len(keys)} "
                                              f"characters (from {base})")
    return _finish(out, rotations)


def load_omniglot(data_dir=None, *, image_size: int = 28, rotations: bool = True,
                  split_dir=None) -> dict[str, FewShotSplit]:
    """Full Omniglot with the Vinyals et al. split (module docstring). ``split_dir`` holds
    ``{train,val,test}.json`` (default: ``fewshot_splits/omniglot`` in the data folders)."""
    dirs = _data_dirs(data_dir, "Omniglot")
    roots = {}
    for part in ("images_background", "images_evaluation"):
        for d in dirs:
            for sub in ("omniglot", ""):
                base = d / sub if sub else d
                if (base / part).is_dir():
                    roots[part] = base / part
                    break
                if (base / f"{part}.zip").is_file():
                    roots[part] = base / f"{part}.zip"
                    break
            if part in roots:
                break
    if len(roots) < 2:
        raise FewShotDataError(
            f"Omniglot not found: need images_background/ and images_evaluation/ (folders or the official .zip "
            f"files), looked in {[str(d) for d in dirs]} and their omniglot/ sub-folders; pass data_dir= or "
            "set L2L_ZOO_DATA")
    given = split_dir is not None
    split_dir = Path(split_dir) if given else None
    if not given:
        for d in dirs:
            if (d / "fewshot_splits" / "omniglot" / "train.json").is_file():
                split_dir = d / "fewshot_splits" / "omniglot"
                break
    if split_dir is None or not (split_dir / "train.json").is_file():
        looked = [str(split_dir)] if given else [str(d / "fewshot_splits" / "omniglot") for d in dirs]
        raise FewShotDataError(f"the Vinyals Omniglot split (train.json, val.json, test.json) was not found in "
                               f"{looked}; pass split_dir=")
    chars = {}
    for part, root in roots.items():
        read = _read_zip_characters(root, image_size) if root.suffix == ".zip" else _read_folder_characters(root, image_size)
        for (a, c), ims in read.items():
            chars[(part.replace("images_", ""), a, c)] = ims
    out = {}
    for name in ("train", "val", "test"):
        p = split_dir / f"{name}.json"
        try:
            spec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FewShotDataError(f"{str(p)!r}: not a readable split file ({e})") from None
        keys = [(part, a, c) for part, als in spec.items() for a, cs in als.items() for c in cs]
        missing = [k for k in keys if k not in chars]
        if missing:
            raise FewShotDataError(f"{len(missing)} characters of {str(p)!r} are not in the image folders "
                                   f"(e.g. {'/'.join(missing[0])})")
        sub = {k[1:]: chars[k] for k in keys}
        out[name] = _split(name, sub, [k[1:] for k in keys],
                           f"omniglot (Vinyals split) {name}: {len(keys)} characters")
    return _finish(out, rotations)
