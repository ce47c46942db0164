"""Cross-batch memory: a FIFO of past (detached) image and text embeddings used as extra negatives.

The entries are registered buffers, so they are part of the module's ``state_dict`` and a
resumed run continues with the queue it stopped with. The owner enqueues the *gathered* global
batch, so every rank holds the same queue and the extra negatives do not depend on how the
batch was split across processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmkit.config_checks import Range, check_settings


class MemoryQueue(nn.Module):
    """The last ``size`` (image embedding, text embedding, image id) rows seen, oldest first.

    Embeddings are stored in float32. The width is taken from the first batch (or set with
    ``allocate``, which a LightningModule calls in ``configure_model`` so that the buffers exist
    before DDP wraps the module); loading a state dict adopts the stored width.

    Args:
        size: number of rows kept.
    """

    setting_ranges = {"size": Range(ge=1, integer=True)}

    def __init__(self, size: int) -> None:
        check_settings(self, locals(), MemoryQueue.setting_ranges)
        super().__init__()
        self.size = size
        self.register_buffer("image", torch.zeros(0, 0))
        self.register_buffer("text", torch.zeros(0, 0))
        self.register_buffer("image_id", torch.zeros(0, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots

    def allocate(self, dim: int, device: torch.device | str | None = None) -> None:
        """Create empty buffers of width ``dim`` (no-op when already of that width)."""
        if self.image.shape == (self.size, dim):
            return
        device = device if device is not None else self.image.device
        self.image = torch.zeros(self.size, dim, device=device)
        self.text = torch.zeros(self.size, dim, device=device)
        self.image_id = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr.zero_()
        self.count.zero_()

    def __len__(self) -> int:
        return int(self.count)

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(image (n, D), text (n, D), image_id (n,))`` of the ``n`` filled rows, oldest first."""
        n = int(self.count)
        if n < self.size:
            # copies: a later enqueue must not change what a caller already holds
            return self.image[:n].clone(), self.text[:n].clone(), self.image_id[:n].clone()
        p = int(self.ptr)
        order = torch.cat([torch.arange(p, self.size), torch.arange(0, p)]).to(self.image.device)
        return self.image[order], self.text[order], self.image_id[order]

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, image_id: Tensor | None = None) -> None:
        """Append rows (the oldest are overwritten once full; of a batch larger than the queue,
        only its last ``size`` rows are kept)."""
        n = image.shape[0]
        if n == 0:
            return
        self.allocate(image.shape[1], image.device)
        if image_id is None:
            image_id = torch.full((n,), -1, dtype=torch.long)
        image, text = image.detach()[-self.size :], text.detach()[-self.size :]
        image_id = image_id.reshape(-1)[-self.size :]
        n = image.shape[0]
        slots = (int(self.ptr) + torch.arange(n)) % self.size
        slots = slots.to(self.image.device)
        self.image.index_copy_(0, slots, image.to(self.image))
        self.text.index_copy_(0, slots, text.to(self.text))
        self.image_id.index_copy_(0, slots, image_id.to(self.image_id))
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args, **kwargs) -> None:
        # The width is known only once data has flowed: take the stored one before loading.
        stored = state_dict.get(prefix + "image")
        if stored is not None and stored.ndim == 2 and stored.shape != self.image.shape:
            if stored.shape[0] == 0:  # saved before any batch: start empty again
                device = self.image.device
                self.image, self.text = torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device)
                self.image_id = torch.zeros(0, dtype=torch.long, device=device)
            elif stored.shape[0] != self.size:
                raise ValueError(f"checkpoint memory queue holds {stored.shape[0]} rows, this one {self.size}")
            else:
                self.allocate(stored.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
