"""A frozen teacher for distillation: how it is specified, loaded, run, and fed its own inputs.

A teacher is any mmkit model spec plus, optionally, weights to put in it:

- an open_clip architecture with weights: ``OpenCLIP(arch, pretrained=TAG or FILE)``;
- an open_clip model on the Hugging Face hub: ``OpenCLIP(arch="hf-hub:ORG/NAME")``;
- an mmkit export folder of an open_clip model: ``OpenCLIP(arch="local-dir:FOLDER")``;
- transformers models: ``HFTowers(vision_model=FOLDER or HUB_ID, text_model=FOLDER or HUB_ID)``;
- an mmkit checkpoint: the spec the run was trained with plus ``checkpoint`` = its Lightning
  ``.ckpt`` (any mmkit module) or its ``mmkit export`` folder.

The teacher keeps its own image transform and tokenizer (those it was trained with): its
``preprocessing`` is offered to the data module as an extra view named ``teacher`` (see
``StudentTeacherPreprocessing``), which produces the ``teacher_images`` / ``teacher_texts`` keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit.checkpoint_io import load_checkpoint
from mmkit.models.dual_encoder import DualEncoder
from mmkit.models.spec import HFTowers, ModelSpec, OpenCLIP

_DTYPES = {
    None: None, "fp32": None, "float32": None, "32": None,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "16": torch.float16,
}


class Teacher:
    """Specification of a frozen teacher.

    Args:
        model: the teacher's model spec (architecture, pretrained weights by tag, hub id or file,
            preprocessing).
        checkpoint: weights that replace the spec's: a Lightning ``.ckpt`` written by any mmkit
            module whose model was built from ``model``, or an ``mmkit export`` folder of it.
        dtype: run the teacher in ``bf16`` or ``fp16`` (weights and inputs); its outputs are
            returned in float32. None (default) keeps float32.
    """

    def __init__(self, model: ModelSpec, checkpoint: str | None = None, dtype: str | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"Teacher: dtype must be one of {sorted(k for k in _DTYPES if k)} or None, got {dtype!r}")
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype

    @property
    def preprocessing(self):
        return self.model.preprocessing

    @property
    def embed_dim(self) -> int:
        """Width of the teacher's embedding space, read from the spec without building weights."""
        if isinstance(self.model, HFTowers):
            return int(self.model.embed_dim)
        if isinstance(self.model, OpenCLIP):
            from mmkit.models.open_clip_model import arch_config

            return int(arch_config(self.model.arch, self.model.cache_dir)["embed_dim"])
        return int(self.model.build().embed_dim)

    def build(self) -> FrozenTeacher:
        # A fixed seed, off the global stream: a teacher without weights (a demo) is the same on
        # every rank and in every run, and building it late does not shift the run's randomness.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.model.build()
        if self.checkpoint is not None:
            load_weights(model, self.checkpoint)
        return FrozenTeacher(model, _DTYPES[self.dtype])


class FrozenTeacher(nn.Module):
    """A dual encoder that never trains: no parameter requires grad, it stays in eval mode
    whatever ``train()`` is called with, and it runs under ``torch.no_grad``, optionally in a
    lower precision, in chunks (only one chunk's activations are alive at a time).
    """

    def __init__(self, model: DualEncoder, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model.to(dtype) if dtype is not None else model
        self.dtype = dtype
        self.model.requires_grad_(False)
        self.train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Lightning and parent modules call train(); the teacher must keep its eval behaviour
        # (no dropout, frozen BatchNorm statistics).
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, texts, chunks: int = 1) -> dict[str, Tensor]:
        n = images.shape[0]
        size = -(-n // max(1, min(chunks, n))) if n else 1
        starts = range(0, n, size) or [0]  # an empty batch still runs once, like the student
        image = torch.cat([self.encode_image(images[i : i + size]) for i in starts])
        text = torch.cat([self.encode_text(_rows(texts, i, i + size)) for i in starts])
        return {"image_features": image, "text_features": text, "logit_scale": self.model.log_scale_parameter().exp().float()}

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        if self.dtype is not None:
            images = images.to(self.dtype)
        return F.normalize(self.model.encode_image(images, normalize=False).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts) -> Tensor:
        return F.normalize(self.model.encode_text(texts, normalize=False).float(), dim=-1)


def _rows(texts, lo: int, hi: int):
    if isinstance(texts, dict):
        return {k: v[lo:hi] for k, v in texts.items()}
    return texts[lo:hi]


def load_weights(model: DualEncoder, checkpoint: str | Path) -> None:
    """Load a Lightning ``.ckpt`` of an mmkit module, or an ``mmkit export`` folder, into
    ``model`` (strictly: a spec that does not match the checkpoint fails here)."""
    path = Path(checkpoint)
    if path.is_dir():
        _load_export(model, path)
        return
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {str(path)!r} (a .ckpt file or an mmkit export folder)")
    ckpt = load_checkpoint(path)  # weights_only; a file carrying code is refused with its name
    state = ckpt.get("state_dict", ckpt)
    # An mmkit module keeps its model under `model.`; a single-tower KD student one level deeper.
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if weights and all(k.startswith("student.") for k in weights):
        weights = {k[len("student.") :]: v for k, v in weights.items()}
    if not weights:
        raise ValueError(f"{path}: no 'model.*' weights in the checkpoint (is it an mmkit module's .ckpt?)")
    model.load_state_dict(weights)


def _load_export(model: DualEncoder, folder: Path) -> None:
    from safetensors.torch import load_file

    if (folder / "open_clip_model.safetensors").is_file():
        model.clip.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")))
    elif (folder / "heads.safetensors").is_file():
        from transformers import AutoModel

        model.vision.load_state_dict(AutoModel.from_pretrained(folder / "vision").state_dict())
        model.text.load_state_dict(AutoModel.from_pretrained(folder / "text").state_dict())
        heads = load_file(str(folder / "heads.safetensors"))
        unexpected = model.load_state_dict(heads, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{folder}/heads.safetensors does not match the teacher spec: unexpected {unexpected}")
    else:
        raise ValueError(f"{folder} is not an mmkit export folder (no open_clip_model.safetensors or heads.safetensors)")


class _TeacherView:
    """The teacher's inputs: its own tokenizer and its evaluation transform. The teacher is a
    fixed target, so it sees the un-augmented image (also what pre-computed embeddings hold)."""

    def __init__(self, image_transform: Callable, tokenize: Callable) -> None:
        self._image_transform = image_transform
        self.tokenize = tokenize

    def image_transform(self, train: bool) -> Callable:
        return self._image_transform


_PROBE = ["a small red circle left of a large blue square", "Grinning face, 2 eyes!"]


def _same_tokens(a: Callable, b: Callable) -> bool:
    x, y = a(_PROBE), b(_PROBE)
    if isinstance(x, dict) != isinstance(y, dict):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x)
    return x.shape == y.shape and torch.equal(x, y)


class StudentTeacherPreprocessing:
    """The student's preprocessing (``image_transform``/``tokenize``) plus ``extra_views`` =
    ``{"teacher": ...}`` with the teacher's own. Where the teacher's transform or tokenizer is
    configured like the student's, the view holds the student's object itself, and the collate
    function reuses the student's tensors instead of computing them twice.
    """

    def __init__(self, student, teacher) -> None:
        self.student = student
        self.tokenize = student.tokenize  # a bound method: equal (==) wherever it is reused
        eval_tf = student.image_transform(train=False)
        teacher_tf = teacher.image_transform(train=False)
        same_images = teacher is student or repr(teacher_tf) == repr(eval_tf)
        same_tokens = teacher is student or _same_tokens(teacher.tokenize, student.tokenize)
        self.extra_views = {
            "teacher": _TeacherView(eval_tf if same_images else teacher_tf, self.tokenize if same_tokens else teacher.tokenize)
        }

    def image_transform(self, train: bool) -> Callable:
        return self.student.image_transform(train=train)
