"""KDStudent: a small student learns from a frozen multimodal teacher (knowledge distillation).

The teacher (``mmkit.models.Teacher``) is run inside ``compute_loss``, under ``torch.no_grad``, on
the whole batch. ``compute_loss`` is called once per step on the whole batch's student features,
also with exact chunked accumulation (``accumulate_chunks > 1``), so the distillation terms, like
the contrastive one, see every sample of the batch and the student's gradient equals that of the
full batch. The teacher's own forward runs in ``accumulate_chunks`` chunks too, so it never holds
more than one chunk's activations.

Where the teacher lives: it is *not* a registered submodule (it is built on first use and held
aside). So it is in neither the optimizer, nor the Lightning checkpoint's ``state_dict`` (a
checkpoint holds the student and the loss's projection only, and resuming rebuilds the teacher
from its spec), nor the exported student, nor DDP/FSDP wrapping; the module moves it to its own
device when it uses it. It stays in eval mode whatever ``train()`` is called with. Under FSDP2
(a device mesh) it is sharded on its own (``mmkit.parallel.ops``'s ``shard_frozen``, same data-parallel mesh):
each rank keeps about 1/N of its weights, and each teacher call gathers them block by block.

Inputs: teacher and student may use different transforms and tokenizers. ``preprocessing``
offers the student's plus an extra view ``teacher`` (the teacher's tokenizer and its evaluation
transform: the teacher sees un-augmented images), which the data module turns into the batch keys
``teacher_images`` / ``teacher_texts`` (the student's tensors are reused where they coincide).

Pre-computed teacher: with ``teacher_embeddings`` the teacher's outputs are looked up by
``batch["index"]`` in a store written once by ``mmkit predict`` with ``predict_with: teacher``
(see ``mmkit.data.teacher_embeddings``); with ``teacher: null`` the teacher is then never built.

Single-tower students (``student_towers: image`` or ``text``): only that tower of the student
spec is trained (the other is frozen and never run); the other modality's features come from
the teacher, so the student lands in the teacher's embedding space (same width required) and is
used with the teacher's other tower. Evaluation scores it that way: for an image student, its
image features against the teacher's text features of the split.

Evaluation also logs ``teacher_agreement`` (``mmkit.metrics.TopOneAgreement``): how often the
student's top-1 choice over the split (caption for an image, image for a caption) is the
teacher's, wherever the split has a teacher (live or stored); exact across ranks like Recall@K.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from mmkit.data.teacher_embeddings import TeacherEmbeddings
from mmkit.losses.distillation import DistillationLoss
from mmkit.losses.protocol import loss_context
from mmkit.metrics.agreement import TopOneAgreement
from mmkit.models.single_tower_student import SingleTowerStudent
from mmkit.models.spec import ModelSpec
from mmkit.models.teacher import FrozenTeacher, StudentTeacherPreprocessing, Teacher
from mmkit.parallel.ops import parallel_ops
from mmkit.techniques.base import DualEncoderModule

_TOWERS = ("both", "image", "text")
_SPLITS = ("train", "val", "test")


class KDStudent(DualEncoderModule):
    """Distil a frozen teacher into a student dual encoder (or one student tower).

    Args:
        model: the student's model spec (e.g. ``mmkit.models.OpenCLIP`` with ``mmkit-tiny``).
        teacher: the frozen teacher (``mmkit.models.Teacher``: a model spec, optional checkpoint,
            optional ``dtype: bf16``). None when training only from ``teacher_embeddings``.
        loss: ``mmkit.losses.DistillationLoss`` (weights of the student's contrastive loss and of
            the similarity, feature and interactive distillation terms). Default: contrastive +
            similarity distillation, weight 1 each. Its ``student_loss`` is any loss of the loss
            protocol or a list of them; it gets the same context as in every technique.
        student_towers: ``both`` (a dual-encoder student), ``image`` or ``text`` (a single-tower
            student used with the teacher's other tower; needs the teacher's embedding width).
        teacher_embeddings: pre-computed teacher outputs: a store folder for the training split,
            or ``{train: DIR, val: DIR, test: DIR}``. Splits without a store use the live teacher
            if ``teacher`` is given; else evaluation reports the student's own loss only.
        predict_with: ``student`` (``mmkit predict`` writes the student's embeddings) or
            ``teacher`` (writes the teacher's, with its logit scale: a teacher-embeddings store).
        **kwargs: optimisation and evaluation settings of ``DualEncoderModule``.
    """

    def __init__(
        self,
        model: ModelSpec,
        teacher: Teacher | None = None,
        loss: DistillationLoss | None = None,
        student_towers: str = "both",
        teacher_embeddings: str | dict[str, str] | None = None,
        predict_with: str = "student",
        **kwargs,
    ) -> None:
        super().__init__(model, **kwargs)
        stores = {"train": teacher_embeddings} if isinstance(teacher_embeddings, (str, Path)) else dict(teacher_embeddings or {})
        if set(stores) - set(_SPLITS):
            raise ValueError(f"KDStudent: teacher_embeddings keys must be among {_SPLITS}, got {sorted(stores)}")
        if teacher is None and "train" not in stores:
            raise ValueError("KDStudent: give a teacher, or teacher_embeddings for the training split")
        if student_towers not in _TOWERS:
            raise ValueError(f"KDStudent: student_towers must be one of {_TOWERS}, got {student_towers!r}")
        if predict_with not in ("student", "teacher"):
            raise ValueError(f"KDStudent: predict_with must be 'student' or 'teacher', got {predict_with!r}")
        if student_towers == "image" and self.zero_shot_classes:
            raise ValueError("KDStudent: zero-shot classification needs a student text tower (student_towers: both or text)")
        if student_towers == "image":
            self.zero_shot_classes = []  # not the data's class names either: no text tower to score them
        self.teacher_spec = teacher
        self.loss = loss if loss is not None else DistillationLoss()
        self.student_towers = student_towers
        self.teacher_embeddings = {k: str(v) for k, v in stores.items()}
        self.predict_with = predict_with
        self._stores: dict[str, TeacherEmbeddings] = {}
        self._preprocessing = None
        self._eval_teacher: tuple[dict, dict[str, Tensor] | None] | None = None  # (batch, its teacher outputs)
        self._agreement = {"val": TopOneAgreement(), "test": TopOneAgreement()}
        # Held aside, not registered: see the module docstring.
        object.__setattr__(self, "_teacher", None)
        self.save_hyperparameters(ignore=["model", "loss", "teacher"])

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            student = self.spec.build()
            self.model = student if self.student_towers == "both" else SingleTowerStudent(student, self.student_towers)
        super().configure_model()
        teacher_dim = self._teacher_dim()
        if self.student_towers != "both" and self.model.embed_dim != teacher_dim:
            raise ValueError(
                f"KDStudent: a single-tower student must embed in the teacher's space: student width "
                f"{self.model.embed_dim} != teacher width {teacher_dim} (choose a student architecture with embed_dim {teacher_dim})"
            )
        self.loss.setup_dims(self.model.embed_dim, teacher_dim)  # the learned projection, if the widths differ
        if self.teacher_spec is not None and parallel_ops(self).shards_parameters:
            # FSDP2: split the frozen teacher's weights over the data-parallel ranks too (built
            # now, on every rank alike: its build is seeded); it is gathered block by block in forward.
            parallel_ops(self).shard_frozen(self.teacher)

    @property
    def preprocessing(self):
        """The student's transforms and tokenizer, plus the teacher's as the ``teacher`` view."""
        if self._preprocessing is None:
            student = self.spec.preprocessing
            if self.teacher_spec is None:
                self._preprocessing = student
            else:
                self._preprocessing = StudentTeacherPreprocessing(student, self.teacher_spec.preprocessing)
        return self._preprocessing

    @property
    def teacher(self) -> FrozenTeacher:
        """The frozen teacher, built on first use and kept on this module's device."""
        if self._teacher is None:
            if self.teacher_spec is None:
                raise ValueError("KDStudent: this needs the live teacher, but `teacher` is not set")
            object.__setattr__(self, "_teacher", self.teacher_spec.build())
        if self._teacher.device != self.device and not parallel_ops(self).shards_parameters:  # FSDP placed a sharded one
            self._teacher.to(self.device)
        return self._teacher

    def _store(self, split: str) -> TeacherEmbeddings | None:
        if split not in self.teacher_embeddings:
            return None
        if split not in self._stores:
            self._stores[split] = TeacherEmbeddings(self.teacher_embeddings[split])
        return self._stores[split]

    def _teacher_dim(self) -> int:
        if self.teacher_spec is not None:
            return self.teacher_spec.embed_dim
        return self._store("train").embed_dim

    # -- training ----------------------------------------------------------------------------
    def teacher_outputs(self, batch: dict, split: str) -> dict[str, Tensor] | None:
        """The teacher's ``image_features``, ``text_features`` and ``logit_scale`` for a batch:
        from the split's store if there is one, else from the live teacher (None if neither)."""
        store = self._store(split)
        if store is not None:
            return store.lookup(batch["index"], self.device)
        if self.teacher_spec is None:
            return None
        if "teacher_images" not in batch:
            raise KeyError(
                "KDStudent: the batch has no 'teacher_images'/'teacher_texts': build the data module with this "
                "module's `preprocessing` (the mmkit CLI links it)"
            )
        return self.teacher(batch["teacher_images"], batch["teacher_texts"], chunks=self.accumulate_chunks)

    def compute_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """Distillation terms of the whole batch. For a single-tower student the loss sees the
        teacher's features in place of the missing modality (``outputs`` is left as it is)."""
        split = "train" if self.training else self._eval_split()
        teacher = self.teacher_outputs(batch, split)
        if not self.training:
            self._eval_teacher = (batch, teacher)  # for eval_features and the agreement: one teacher forward per eval batch
        if teacher is None:  # evaluation without a teacher for this split
            self._require_teacher(split)
            return self.loss.student_terms(**outputs, **loss_context(self.global_step, batch))
        return super().compute_loss({**self._with_teacher_tower(outputs, teacher), **{f"teacher_{k}": v for k, v in teacher.items()}}, batch)

    # -- evaluation --------------------------------------------------------------------------
    def eval_features(self, outputs: dict[str, Tensor], batch: dict, split: str) -> dict[str, Tensor]:
        """A single-tower student is scored with the teacher's other tower: its own modality's
        features against the teacher's features of the batch for the missing one."""
        if self.student_towers == "both":
            return outputs
        teacher = self._batch_teacher(batch, split)
        if teacher is None:
            self._require_teacher(split)
        return self._with_teacher_tower(outputs, teacher)

    def _batch_teacher(self, batch: dict, split: str) -> dict[str, Tensor] | None:
        """The teacher's outputs for an eval batch: those the loss just got for it, or a new call
        (kept for the next hook of the same batch)."""
        cached = self._eval_teacher
        if cached is None or cached[0] is not batch:
            cached = self._eval_teacher = (batch, self.teacher_outputs(batch, split))
        return cached[1]

    def _has_teacher(self, split: str) -> bool:
        return self.teacher_spec is not None or split in self.teacher_embeddings

    def on_eval_start(self, split: str) -> None:
        super().on_eval_start(split)
        self._agreement[split] = self._agreement[split].to(self.device)
        self._agreement[split].reset()

    def update_eval_metrics(self, features: dict[str, Tensor], batch: dict, split: str) -> None:
        if self._has_teacher(split):
            self._agreement[split].update(features, self._batch_teacher(batch, split), batch["image_id"], batch.get("index"))
        self._eval_teacher = None  # the batch is done

    def eval_metrics(self, split: str) -> dict[str, Tensor]:
        metrics = super().eval_metrics(split)
        if self._has_teacher(split):  # the same on every rank (configuration)
            metrics["teacher_agreement"] = self._agreement[split].compute().float()
        return metrics

    def _with_teacher_tower(self, outputs: dict[str, Tensor], teacher: dict[str, Tensor]) -> dict[str, Tensor]:
        # A single-tower student's placeholder for the missing modality, replaced by the teacher's.
        if self.student_towers == "both":
            return outputs
        missing = "text_features" if self.student_towers == "image" else "image_features"
        return {**outputs, missing: teacher[missing]}

    def _require_teacher(self, split: str) -> None:
        if self.student_towers != "both":
            raise ValueError(
                f"KDStudent: evaluating a single-tower student on '{split}' needs the teacher's other tower: "
                f"give `teacher` or teacher_embeddings for '{split}'"
            )

    def _eval_split(self) -> str:
        return "test" if self._trainer is not None and self.trainer.testing else "val"

    # -- prediction --------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """The student's embeddings (single-tower: with the teacher's for the other modality), or
        with ``predict_with: teacher`` the teacher's plus its logit scale per row: a store for
        ``teacher_embeddings``."""
        if self.predict_with == "student" and self.student_towers == "both":
            return super().predict_step(batch, batch_idx)
        out = self.teacher(batch["teacher_images"], batch["teacher_texts"], chunks=self.accumulate_chunks)
        if self.predict_with == "student":  # a single-tower student: its own modality from itself
            student = self.model(batch["images"], batch["texts"])
            own = "image_features" if self.student_towers == "image" else "text_features"
            out = {**out, own: student[own], "logit_scale": student["logit_scale"]}
        n = batch["index"].shape[0]
        return {
            "image_features": out["image_features"].float(),
            "text_features": out["text_features"].float(),
            "logit_scale": out["logit_scale"].float().expand(n).contiguous(),
            "index": batch["index"],
            "image_id": batch["image_id"],
        }
