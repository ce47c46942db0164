"""Image–text pairs listed in a CSV/TSV or JSONL manifest, images on disk."""

from __future__ import annotations

import csv
import functools
import json
import os
import warnings
from typing import Any

from torch.utils.data import Dataset

from mmkit.data.sample import BadSample, caption_too_long, clean_caption, decode_image, make_sample
from mmkit.data.sources._columns import require_columns

_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSONL = {".jsonl", ".ndjson"}
# A missing caption written out as text (pandas' ``astype(str)``/``to_csv`` of NaN, None, pd.NA).
_MISSING_AS_TEXT = {"nan", "none", "<na>"}


class ManifestDataset(Dataset):
    """Map-style dataset over a manifest file with one image–caption pair per row.

    Rows that share an image path share an ``image_id`` (several captions of one image). In JSONL
    a caption field may also hold a list of captions: each becomes its own sample.

    Args:
        path: The manifest: ``.csv``, ``.tsv``/``.tab`` (delimiter from the extension) or ``.jsonl``.
        image_column: Column holding the image path.
        caption_column: Column holding the caption text.
        label_column: Optional column with a class label (integers, or names mapped to
            indices in sorted order and listed in ``class_names``). Empty cells give -1.
        class_names: The classes' names in label order: names for integer labels (label i is
            ``class_names[i]``), or the order of string labels (every label must be listed).
            Zero-shot evaluation scores with these names by default.
        image_root: Folder that relative image paths resolve against; default: the manifest's folder.
    """

    def __init__(
        self,
        path: str,
        image_column: str = "image",
        caption_column: str = "caption",
        label_column: str | None = None,
        image_root: str | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.path = str(path)
        ext = os.path.splitext(self.path)[1].lower()
        if ext not in _DELIMITERS and ext not in _JSONL:
            raise ValueError(
                f"ManifestDataset: {self.path}: unsupported manifest extension {ext!r}; use one of "
                f"{', '.join(sorted([*_DELIMITERS, *_JSONL]))}"
            )
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"ManifestDataset: path={self.path!r} does not exist (the manifest file)")
        if image_root is not None and not os.path.isdir(image_root):
            raise FileNotFoundError(f"ManifestDataset: image_root={image_root!r} is not a folder")
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(self.path))
        columns, records = self._read(self.path)
        require_columns(self.path, columns, image_column=image_column, caption_column=caption_column,
                        label_column=label_column)

        # Flatten to parallel lists: cheap to index and to share with forked workers.
        self._images: list[str | None] = []
        self._captions: list[Any] = []
        self._lines: list[int] = []
        raw_labels: list[Any] = []
        for line, rec in records:
            if rec is None:  # unparsable JSONL line: keep it so it is reported and counted, not hidden
                rec = {}
            captions = rec.get(caption_column)
            for caption in captions if isinstance(captions, list) else [captions]:
                self._images.append(rec.get(image_column))
                self._captions.append(caption)
                self._lines.append(line)
                raw_labels.append(rec.get(label_column) if label_column else None)
        missing_as_text = [i for i, c in enumerate(self._captions)
                           if isinstance(c, str) and c.strip().lower() in _MISSING_AS_TEXT]
        if missing_as_text:
            lines = ", ".join(str(self._lines[i]) for i in missing_as_text[:5]) + (", ..." if len(missing_as_text) > 5 else "")
            warnings.warn(
                f"ManifestDataset: {self.path}: {len(missing_as_text)} of {len(self._captions)} captions are the text "
                f"'nan'/'None' (lines {lines}): missing values written out as text, e.g. by pandas; they are "
                "skipped as bad samples, not trained on", UserWarning, stacklevel=2)
        self._labels, self.class_names = _encode_labels(raw_labels, class_names, f"{self.path} column {label_column!r}", self._lines)
        self._image_ids = _ids_by_path([self._resolve(p) for p in self._images])

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        bad = functools.partial(BadSample, index=index)  # a bad row keeps its index: counted once however often met
        where = f"{self.path} row {index} (line {self._lines[index]})"
        caption = clean_caption(self._captions[index])
        if caption is None:
            return bad(f"{where}: empty or missing caption")
        if caption.lower() in _MISSING_AS_TEXT:
            return bad(f"{where}: caption is {caption!r}, a missing value written as text")
        if too_long := caption_too_long(caption):
            return bad(f"{where}: {too_long}")
        rel = self._images[index]
        if not isinstance(rel, str) or not rel.strip():
            return bad(f"{where}: empty or missing image path")
        image = decode_image(self._resolve(rel), rel)
        if isinstance(image, str):
            return bad(f"{where}: {image}")
        return make_sample(image, caption, index, self._image_ids[index], self._labels[index])

    def _resolve(self, rel: Any) -> str | None:
        if not isinstance(rel, str):
            return None
        return rel if os.path.isabs(rel) else os.path.join(self.image_root, rel)

    @staticmethod
    def _read(path: str) -> tuple[list[str], list[tuple[int, dict | None]]]:
        """Column names and (line number, record) pairs; a JSONL line that is not valid JSON gives None."""
        ext = os.path.splitext(path)[1].lower()
        if ext in _JSONL:
            records: list[tuple[int, dict | None]] = []
            columns: dict[str, None] = {}
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = None
                    if not isinstance(rec, dict):
                        rec = None
                    else:
                        columns.update(dict.fromkeys(rec))
                    records.append((line_no, rec))
            return list(columns), records
        if ext in _DELIMITERS:
            # csv's default field limit (128 KiB) fails the whole file at the first long cell;
            # read every row and let the sample's own checks skip and name it.
            csv.field_size_limit(2**31 - 1)
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter=_DELIMITERS[ext])
                header = list(reader.fieldnames or [])
                records = []
                for rec in reader:
                    records.append((reader.line_num, rec))
            return header, records
        raise ValueError(
            f"{path}: unsupported manifest extension {ext!r}; use one of "
            f"{', '.join(sorted([*_DELIMITERS, *_JSONL]))}"
        )


def _ids_by_path(paths: list[str | None]) -> list[int]:
    """Dense image ids in first-seen order; rows without a path get their own id."""
    ids: dict[str, int] = {}
    out = []
    for p in paths:
        if p is None:
            out.append(len(ids))
            ids[f"\0{len(out)}"] = out[-1]  # unique placeholder so later ids stay dense
        else:
            out.append(ids.setdefault(os.path.normpath(p), len(ids)))
    return out


def _encode_labels(
    raw: list[Any], names: list[str] | None, where: str, lines: list[int]
) -> tuple[list[int], list[str] | None]:
    """Integer labels as they are; string labels mapped to their index in ``names`` (default: the
    sorted distinct labels); missing -> -1. Returns the labels and the class names (or None)."""
    present = [(i, str(r).strip()) for i, r in enumerate(raw) if r is not None and str(r).strip() != ""]
    try:
        labels = [-1] * len(raw)
        for i, value in present:
            labels[i] = int(value)
    except ValueError:
        labels = None
    if labels is not None:  # integer labels
        beyond = [(i, v) for i, v in enumerate(labels) if names is not None and v >= len(names)]
        if beyond:
            i, v = beyond[0]
            raise ValueError(f"{where} line {lines[i]}: label {v} has no name: class_names lists {len(names)}")
        return labels, (list(names) if names is not None else None)
    class_names = list(names) if names is not None else sorted({v for _, v in present})
    lookup = {name: k for k, name in enumerate(class_names)}
    labels = [-1] * len(raw)
    for i, value in present:
        if value not in lookup:
            raise ValueError(f"{where} line {lines[i]}: label {value!r} is not among class_names {class_names}")
        labels[i] = lookup[value]
    return labels, class_names
