"""Image–text pairs from a local Hugging Face ``datasets`` folder (``save_to_disk`` output)."""

from __future__ import annotations

import functools
import os
from typing import Any

from torch.utils.data import Dataset

from mmkit.data.sample import BadSample, caption_too_long, clean_caption, decode_image, make_sample
from mmkit.data.sources._columns import require_columns


class HFImageTextDataset(Dataset):
    """Map-style dataset over a dataset saved with ``datasets``' ``save_to_disk``.

    The image column may hold images (the ``Image`` feature), raw bytes, or paths (relative ones
    resolve against ``image_root``). A caption column holding a list of captions per row gives
    one sample per caption; captions of one row share an ``image_id``.

    Args:
        path: Folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.
        split: Split to use when the folder holds a ``DatasetDict`` (optional if it has one split).
        image_column: Column holding the image.
        caption_column: Column holding the caption (a string, or a list of strings).
        label_column: Optional integer / ``ClassLabel`` column; missing values give -1.
        image_root: Folder for relative image paths; default: ``path``.
    """

    def __init__(
        self,
        path: str,
        split: str | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        label_column: str | None = None,
        image_root: str | None = None,
    ) -> None:
        import datasets  # optional dependency (the `hf` extra): only needed when this source is used

        self.path = str(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(
                f"HFImageTextDataset: path={self.path!r} is not a folder (a dataset saved with save_to_disk; "
                "mmkit never downloads datasets)"
            )
        self.where = self.path if split is None else f"{self.path}[{split}]"
        loaded = datasets.load_from_disk(self.path)
        if isinstance(loaded, datasets.DatasetDict):
            if split is None and len(loaded) != 1:
                raise ValueError(f"{self.path}: holds splits {sorted(loaded)}; pass split=")
            loaded = loaded[split if split is not None else next(iter(loaded))]
        elif split is not None:
            raise ValueError(f"{self.path}: is a single Dataset, not a DatasetDict; drop split={split!r}")
        require_columns(self.where, loaded.column_names, image_column=image_column,
                        caption_column=caption_column, label_column=label_column)
        features = loaded.features
        if isinstance(features[image_column], datasets.Image):
            # decode ourselves, so a corrupt image becomes a counted BadSample instead of an exception
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
        self.class_names: list[str] | None = (
            list(features[label_column].names)
            if label_column and isinstance(features[label_column], datasets.ClassLabel) else None
        )
        self.dataset = loaded
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self.image_root = image_root if image_root is not None else self.path
        # Samples are (row, caption number); only list-valued caption columns need a lookup table.
        self._rows: list[tuple[int, int]] | None = None
        if type(features[caption_column]).__name__ in {"Sequence", "List", "LargeList"} or isinstance(
            features[caption_column], list
        ):
            self._rows = [
                (row, j) for row, caps in enumerate(loaded[caption_column]) for j in range(len(caps or []) or 1)
            ]

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        row, j = self._rows[index] if self._rows is not None else (index, None)
        bad = functools.partial(BadSample, index=index)  # a bad row keeps its index: counted once however often met
        where = f"{self.where} row {row}"
        record = self.dataset[row]
        caption = record[self.caption_column]
        if j is not None:
            caption = caption[j] if caption and j < len(caption) else None
        caption = clean_caption(caption)
        if caption is None:
            return bad(f"{where}: empty or missing caption")
        if too_long := caption_too_long(caption):
            return bad(f"{where}: {too_long}")
        image = self._decode(record[self.image_column])
        if isinstance(image, str):
            return bad(f"{where}: {image}")
        label = record[self.label_column] if self.label_column else None
        return make_sample(image, caption, index, row, -1 if label is None else int(label))

    def _decode(self, value: Any):
        """An RGB image from an Image-feature dict, bytes, a path, or a decoded PIL image."""
        if isinstance(value, dict):  # the Image feature with decode=False: {"bytes", "path"}
            if value.get("bytes"):
                return decode_image(value["bytes"], value.get("path") or "<bytes>")
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return decode_image(value, "<bytes>")
        if isinstance(value, str) and value:
            full = value if os.path.isabs(value) else os.path.join(self.image_root, value)
            return decode_image(full, value)
        if hasattr(value, "convert"):  # already a PIL image
            return value.convert("RGB")
        return "image is missing"
