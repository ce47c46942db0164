"""The one shared base of mmkit's LightningModules: a dual encoder trained on image–text batches.

It owns what every technique needs: building the model in ``configure_model`` (so FSDP/DeepSpeed
can shard it), the manual optimisation step (exact chunked accumulation, gradient clipping,
non-finite-loss skipping, temperature clamping), retrieval / zero-shot evaluation, embedding
prediction and export. A technique subclass provides ``compute_loss`` and whatever else is its own.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from mmkit import distributed as D
from mmkit.config_checks import Range, check_settings
from mmkit.file_modes import give_folder_usual_modes
from mmkit.losses.protocol import (
    call_loss,
    loss_context,
    setup_loss,
    uses_logit_bias,
    uses_logit_scale,
)
from mmkit.metrics.retrieval import RetrievalMetrics
from mmkit.metrics.zeroshot import (
    ZeroShotAccuracy,
    build_zeroshot_classifier,
    zero_shot_class_names,
)
from mmkit.models.dual_encoder import MAX_LOGIT_SCALE, DualEncoder
from mmkit.models.spec import ModelSpec
from mmkit.parallel.ops import check_strategy, parallel_ops
from mmkit.run_folder import run_folder
from mmkit.training.compile import compile_options
from mmkit.training.gathered_log import log_gathered
from mmkit.training.grad_cache import chunked_backward
from mmkit.training.log_cadence import logs_step_values
from mmkit.training.optim import fused_adamw_supported, param_groups, warmup_cosine


class NonFiniteLossError(RuntimeError):
    pass


def loss_total(terms: dict[str, Tensor]) -> Tensor:
    """Sum of the ``*_loss`` terms; other entries of a loss's dict are statistics, only logged."""
    return sum(v for k, v in terms.items() if k.endswith("_loss"))


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """``module`` and its submodules in eval mode, each put back in its own mode afterwards (a
    locked tower or a teacher may be in eval mode inside a training module)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _update_scores(retrieval: RetrievalMetrics, zeroshot: ZeroShotAccuracy, classifier: Tensor | None,
                   features: dict[str, Tensor], batch: dict) -> None:
    retrieval.update(features["image_features"], features["text_features"], batch["image_id"], batch.get("index"))
    if classifier is not None and "label" in batch:
        zeroshot.update(features["image_features"], batch["label"], classifier)


def _scores(retrieval: RetrievalMetrics, zeroshot: ZeroShotAccuracy | None) -> dict[str, Tensor]:
    """The evaluation keys: retrieval's, and zero-shot's as ``zeroshot_<key>`` (None: no classifier)."""
    metrics = retrieval.compute()
    if zeroshot is not None:
        metrics.update({f"zeroshot_{k}": v for k, v in zeroshot.compute().items()})
    return metrics


def one_row_like(images: Tensor, texts) -> tuple[Tensor, object]:
    """A one-row batch of zeros with the shapes and types of ``images`` and ``texts`` (a tensor or
    a dict of tensors), e.g. of an empty batch."""
    def row(t: Tensor) -> Tensor:
        return t.new_zeros((1, *t.shape[1:]))

    return row(images), ({k: row(v) for k, v in texts.items()} if isinstance(texts, dict) else row(texts))


class DualEncoderModule(L.LightningModule):
    """Shared training/evaluation machinery (see module docstring).

    A technique overrides public hooks only (none of the underscore-named methods):

    - ``compute_loss(outputs, batch)``: the named ``*_loss`` terms (required).
    - ``project(outputs)``: map the model's features before the loss, evaluation and prediction.
    - training, in step order: ``parameter_penalty()`` (parameter-space terms, e.g. EWC's);
      ``training_loss(outputs, batch)`` (what is back-propagated; default ``compute_loss``);
      ``loss_parameters()`` (a loss's own parameters, for exact chunked accumulation);
      ``after_backward(terms)`` (statistics to log; a non-finite ``*_loss`` skips the step).
      Everything strategy-specific goes through ``mmkit.parallel.ops``.
    - evaluation, called for ``split`` ``"val"`` or ``"test"``, in this order:
      ``on_eval_start(split)`` once before the pass; per batch, after ``compute_loss``,
      ``eval_features(outputs, batch, split)`` (the features that are scored) and
      ``update_eval_metrics(features, batch, split)``; ``eval_metrics(split)`` once after the
      pass, a dict logged as ``<split>/<name>``. Overrides of ``on_eval_start`` and
      ``eval_metrics`` call ``super()``.

    Public helpers for a technique's own evaluation: ``zero_shot_classifier(class_names)`` and
    ``score_loader(loader, classifier)`` (the scores an evaluation pass logs, for any loader).
    For the run report (``mmkit.callbacks.RunReport``): ``example_features(batch)`` (a few eval
    rows' features and the zero-shot classifier, on one rank) and the hook ``report_figures()``
    (figures a technique writes itself, e.g. EWCIncremental's matrix heatmaps).

    Args:
        model: the model spec (towers, locking, similarity head).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms, biases, embeddings, temperature).
        betas: AdamW betas (CLIP uses 0.9, 0.98).
        eps: AdamW epsilon.
        warmup_steps: linear warmup length in optimizer steps.
        min_lr_ratio: final learning rate of the cosine schedule as a fraction of ``lr``.
        grad_clip_norm: clip the global gradient norm to this (None: no clipping).
        accumulate_chunks: split each batch into this many chunks for exact accumulation with a
            chunk's activation memory (the loss still sees the whole batch's negatives). Use this,
            not the Trainer's ``accumulate_grad_batches``, for batch-level losses.
        max_logit_scale: clamp of the learnable inverse temperature (CLIP: 100).
        max_consecutive_nonfinite: skip steps whose loss is NaN/inf; stop after this many in a row.
        zero_shot_classes: class names for zero-shot accuracy on labelled eval splits. Default:
            the eval data's own class names (where it has them); ``[]`` turns zero-shot off. A
            given list is matched to the data's names by name (its order does not matter).
        zero_shot_templates: prompt templates with ``{}`` for the class name.
        export_dir: where to write the trained model at the end of ``fit`` (default:
            ``<log_dir>/export``); an empty string disables the export.
        compile: compile the two towers' encoders with ``torch.compile``: ``false`` (default),
            ``true`` (torch's defaults) or its options, e.g. ``{mode: max-autotune, dynamic: false}``
            (keys: mode, dynamic, fullgraph, backend, options). Applied in ``configure_model``
            after FSDP2 sharding; checkpoints and exports keep the eager model's keys. The first
            steps are slower (compilation).
    """

    # Valid values of the numeric settings, checked at construction (mmkit.config_checks).
    setting_ranges = {
        "lr": Range(gt=0),
        "weight_decay": Range(ge=0),
        "betas": Range(ge=0, lt=1, length=2),
        "eps": Range(gt=0),
        "warmup_steps": Range(ge=0, integer=True),
        "min_lr_ratio": Range(ge=0, le=1),
        "grad_clip_norm": Range(gt=0, none="no clipping"),
        "accumulate_chunks": Range(ge=1, integer=True),
        "max_logit_scale": Range(gt=0),
        "max_consecutive_nonfinite": Range(ge=1, integer=True),
    }

    def __init__(
        self,
        model: ModelSpec,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        grad_clip_norm: float | None = 1.0,
        accumulate_chunks: int = 1,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        max_consecutive_nonfinite: int = 5,
        zero_shot_classes: list[str] | None = None,
        zero_shot_templates: list[str] | None = None,
        export_dir: str | None = None,
        compile: bool | dict = False,
    ) -> None:
        check_settings(self, locals(), DualEncoderModule.setting_ranges)
        super().__init__()
        self.automatic_optimization = False
        self.spec = model
        self.model: DualEncoder | None = None
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.grad_clip_norm = grad_clip_norm
        self.accumulate_chunks = accumulate_chunks
        self.max_logit_scale = max_logit_scale
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.zero_shot_classes = zero_shot_classes
        self.zero_shot_templates = zero_shot_templates or ["a photo of a {}.", "{}"]
        self.export_dir = export_dir
        # Not ``self.compile``: that is nn.Module's own method.
        self.compile_options = compile_options(compile, f"{type(self).__name__}: compile")
        self.nonfinite_steps = 0
        self._consecutive_nonfinite = 0
        self._retrieval = {"val": RetrievalMetrics(), "test": RetrievalMetrics()}
        self._zeroshot = {"val": ZeroShotAccuracy(), "test": ZeroShotAccuracy()}
        self._classifier: Tensor | None = None
        self.save_hyperparameters(ignore=["model", "loss"])

    # -- model -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # A strategy that would build this module wrongly (Lightning's own DeepSpeedStrategy) is
        # refused with an error naming mmkit's. A subclass must call super().setup(stage).
        check_strategy(self.trainer.strategy)
        D.destroy_group_at_exit()

    def configure_model(self) -> None:
        # Idempotent: Lightning may call it more than once, and the model may be built earlier.
        if self.model is None:
            self.model = self.spec.build()
        parallel_ops(self).shard(self.model)  # FSDP2: the towers' blocks; otherwise nothing
        if self.compile_options is not None:  # after sharding: compiled code sees FSDP2's modules
            self.model.compile_towers(**self.compile_options)
        # The loss's width-dependent state (a memory queue) exists before DDP wraps the module.
        setup_loss(self.loss, self.model.embed_dim, next(self.model.parameters()).device)
        # A temperature (bias) that no loss reads gets no gradient: freeze it, or DDP's reducer
        # would wait for that gradient (an error on the next step) and AdamW carry it for nothing.
        for param, used in ((self.model.log_scale_parameter(), uses_logit_scale(self.loss)),
                            (self.model.bias_parameter(), uses_logit_bias(self.loss))):
            if isinstance(param, torch.nn.Parameter) and not used:
                param.requires_grad_(False)

    @property
    def preprocessing(self):
        """Transforms and tokenizer of the model, linked into the data module by the CLI."""
        return self.spec.preprocessing

    def forward(self, images: Tensor, texts) -> dict[str, Tensor]:
        """The model's outputs as the loss, evaluation and prediction see them (after ``project``)."""
        return self.project(self.model(images, texts))

    def project(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook: map the model's features before the loss, evaluation and prediction (e.g.
        MetricAlign's projection head). Gets a dict with ``image_features`` and/or
        ``text_features``; runs inside each chunk of exact accumulation. Default: unchanged."""
        return outputs

    # -- training ----------------------------------------------------------------------------
    def compute_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """Named ``*_loss`` terms from the model outputs of the whole batch (other keys are
        detached statistics, logged but not optimised). Default: ``self.loss``, which a technique
        sets in ``__init__`` (``mmkit.losses.protocol.as_loss``), called through the loss protocol
        with the context (global step, image ids) every technique gives its loss."""
        return call_loss(self.loss, {**outputs, **loss_context(self.global_step, batch)})

    def training_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """Hook: the terms the training step back-propagates, from the model outputs of the whole
        batch (also under exact chunked accumulation). Default: ``compute_loss``; AlignGAN puts
        its critic steps here."""
        return self.compute_loss(outputs, batch)

    def parameter_penalty(self) -> dict[str, Tensor]:
        """Hook for parameter-space penalties (e.g. EWC): named ``*_loss`` terms, differentiable in
        the parameters and the same on every rank. The step back-propagates them once, with the
        data loss's gradient reduction, whatever the strategy. Default: none."""
        return {}

    def loss_parameters(self) -> list[Tensor]:
        """Hook: trainable parameters outside the model that ``training_loss`` back-propagates into
        (e.g. a loss's learned projection): exact chunked accumulation needs
        them. Default: every trainable parameter of the module that is not the model's."""
        in_model = {id(p) for p in self.model.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in in_model]

    def after_backward(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook run on every rank after the step's backward, before its finiteness check: returns
        statistics to log with the step. A returned ``*_loss`` that is not finite on some rank
        skips the step (it is not part of ``train/loss``). Default: none."""
        return {}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if batch["images"].shape[0] == 0 and D.world_size() == 1:
            return None  # every sample of this batch was bad (counted by the data layer)
        ops = parallel_ops(self)
        opt = self._main_optimizer()
        penalty = self.parameter_penalty()
        with ops.backward_scope(self.accumulate_chunks):  # DeepSpeed ZeRO: one reduction for all chunks
            if self.accumulate_chunks > 1:
                if penalty and loss_total(penalty).requires_grad:
                    with ops.no_sync():  # reduced with the chunks' gradients (by the last chunk)
                        self.manual_backward(loss_total(penalty))
                terms = chunked_backward(
                    self.forward, lambda **out: self.training_loss(out, batch), batch["images"], batch["texts"],
                    self.accumulate_chunks, self.manual_backward, ops.no_sync, params=self.loss_parameters(),
                )
            else:
                terms = self.training_loss(self.forward(batch["images"], batch["texts"]), batch)
                self.manual_backward(loss_total(terms) + loss_total(penalty))
                terms = {k: v.detach() for k, v in terms.items()}
        terms.update({k: v.detach() for k, v in penalty.items()})
        stats = self.after_backward(terms)
        total = loss_total(terms).detach()

        if not self._all_ranks_finite(total + loss_total(stats)):
            self._skip_step(opt, {**terms, **stats}, batch_idx)
            return total
        self._consecutive_nonfinite = 0
        ops.after_backward()  # gradients the strategy did not reduce (replicated beside FSDP2, outside DDP)
        ops.clip_gradients(opt, self.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ops.clamp_(self.model.log_scale_parameter(), 0.0, math.log(self.max_logit_scale))
        self._log_train({**terms, **stats}, total, batch)  # before the scheduler moves on: the LR this step used
        self._main_scheduler().step()
        return total

    def _main_optimizer(self):
        opts = self.optimizers()
        return opts[0] if isinstance(opts, (list, tuple)) else opts

    def _main_scheduler(self):
        scheds = self.lr_schedulers()
        return scheds[0] if isinstance(scheds, (list, tuple)) else scheds

    def _all_ranks_finite(self, total: Tensor) -> bool:
        # All ranks must agree to skip, or DDP would deadlock on the next all-reduce.
        bad = torch.tensor([0.0 if torch.isfinite(total) else 1.0], device=total.device)
        return D.all_reduce_sum(bad).item() == 0

    def _skip_step(self, opt, terms: dict[str, Tensor], batch_idx: int) -> None:
        opt.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), rank_zero_only=True)
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            bad = [k for k, v in terms.items() if k.endswith("_loss") and not torch.isfinite(v)]
            raise NonFiniteLossError(
                f"loss was non-finite for {self._consecutive_nonfinite} consecutive steps "
                f"(last at global step {self.global_step}, batch {batch_idx}); "
                f"non-finite terms on this rank: {bad or 'none (another rank)'}; "
                "lower the learning rate or check the data"
            )

    def _log_train(self, terms: dict[str, Tensor], total: Tensor, batch: dict) -> None:
        if not logs_step_values(self._trainer):
            return  # a step the loggers do not write: skip the cost of logging it
        bs = int(batch["images"].shape[0])
        for name, value in terms.items():  # loss terms and the losses' own statistics
            self.log(f"train/{name}", value.float(), batch_size=bs, sync_dist=False)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        scale = self.model.log_scale_parameter().exp().detach()
        self.log("train/temperature", 1.0 / scale, batch_size=bs)
        self.log("train/logit_scale", scale, batch_size=bs)
        self.log("train/lr", self._main_scheduler().get_last_lr()[0], prog_bar=True, batch_size=bs)

    # -- evaluation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.on_eval_start("val")

    def on_test_epoch_start(self) -> None:
        self.on_eval_start("test")

    def on_eval_start(self, split: str) -> None:
        """Hook: before a validation (``split="val"``) or test (``"test"``) pass: resets the
        split's metrics and builds its zero-shot classifier. An override resets its own metrics
        too and calls ``super().on_eval_start(split)``."""
        for metrics in (self._retrieval, self._zeroshot):
            metrics[split] = metrics[split].to(self.device)
            metrics[split].reset()
        class_names = zero_shot_class_names(self.zero_shot_classes, self._eval_class_names(split), f"{split} data")
        self._classifier = self.zero_shot_classifier(class_names)

    def zero_shot_classifier(self, class_names: list[str]) -> Tensor | None:
        """(C, D) normalised class embeddings of the current weights for ``class_names`` (row i
        scores label i), from ``zero_shot_templates``; None without names. The prompts go through
        the model's forward and ``project``, like the texts evaluation scores, in eval mode and
        without gradients. Under ZeRO-3 a collective: every rank must call it."""
        if not class_names:
            return None
        tokenize = self.preprocessing.tokenize

        def encode(prompts: list[str]) -> Tensor:
            tokens = move_data_to_device(tokenize(prompts), self.device)
            # Through the model's own forward (not encode_text): FSDP2 gathers the root there.
            return self.project({"text_features": self.model(None, tokens)["text_features"]})["text_features"]

        # ZeRO-3 gathers parameters only inside a module's forward; this runs outside any.
        with torch.no_grad(), parallel_ops(self).gathered(self), _eval_mode(self):
            return build_zeroshot_classifier(class_names, self.zero_shot_templates, encode)

    def eval_features(self, outputs: dict[str, Tensor], batch: dict, split: str) -> dict[str, Tensor]:
        """Hook: the features evaluation scores for an eval batch (retrieval, zero-shot and
        ``update_eval_metrics``), from the batch's model ``outputs`` (after ``project``), which it
        must not modify. Default: the outputs (KDStudent: a single-tower student's missing
        modality from its teacher)."""
        return outputs

    def update_eval_metrics(self, features: dict[str, Tensor], batch: dict, split: str) -> None:
        """Hook: feed a technique's own evaluation metrics with an eval batch's features (those
        of ``eval_features``); reset them in ``on_eval_start``, report them from
        ``eval_metrics``. Default: none."""

    def eval_metrics(self, split: str) -> dict[str, Tensor]:
        """Hook: the split's metrics at the end of its pass, computed over the whole split (every
        rank's rows) so identical on every rank; each is logged as ``<split>/<name>``. Default:
        retrieval Recall@K / median rank and, with a classifier, ``zeroshot_top<k>``. An
        override adds its own to ``super().eval_metrics(split)``."""
        return _scores(self._retrieval[split], self._zeroshot[split] if self._classifier is not None else None)

    @torch.no_grad()
    def example_features(self, batch: dict) -> dict | None:
        """The features the run report draws its pictures from, for a few rows of an eval batch:
        ``image_features`` and ``text_features`` as evaluation scores them (``eval_features``)
        and, where the validation data has class names, the zero-shot ``classifier`` and its
        ``class_names``. Runs on one rank alone (no collective), in eval mode; None where the
        parameters are sharded over ranks (FSDP2, ZeRO-3), whose forward is a collective."""
        ops = parallel_ops(self)
        if ops.shards_parameters or ops.partitions_parameters:
            return None
        batch = move_data_to_device(batch, self.device)
        with _eval_mode(self):
            out = self.forward(batch["images"], batch["texts"])
            features = self.eval_features(out, batch, "val")
            class_names = zero_shot_class_names(self.zero_shot_classes, self._eval_class_names("val"), "val data")
            classifier = self.zero_shot_classifier(class_names)
        return {"image_features": features["image_features"], "text_features": features["text_features"],
                "classifier": classifier, "class_names": class_names}

    def report_figures(self) -> dict[str, Path]:
        """Hook: figures a technique writes itself that the run report shows (title → PNG path,
        linked, not copied); called on rank 0 at the end of the run. Default: none."""
        return {}

    @torch.no_grad()
    def score_loader(self, loader, classifier: Tensor | None = None, split: str = "val") -> dict[str, Tensor]:
        """Retrieval (and, given a ``classifier`` from ``zero_shot_classifier``, zero-shot) scores
        of the current weights over ``loader`` (this rank's share of the data), with the keys and
        values an evaluation pass logs, outside Lightning's loops (e.g. EWCIncremental's per-task
        evaluation during ``fit``). Runs in eval mode; empty when no rank had a sample. A
        collective: every rank must call it, with the same number of batches."""
        retrieval, zeroshot = RetrievalMetrics().to(self.device), ZeroShotAccuracy().to(self.device)
        rows = 0
        with _eval_mode(self):
            for batch in loader:
                batch = move_data_to_device(batch, self.device)
                if batch["images"].shape[0] == 0:  # every sample of the batch was bad
                    self._lockstep_forward(batch)
                    continue
                features = self.eval_features(self.forward(batch["images"], batch["texts"]), batch, split)
                _update_scores(retrieval, zeroshot, classifier, features, batch)
                rows += batch["images"].shape[0]
        if D.all_reduce_sum(torch.tensor([float(rows)], device=self.device)).item() == 0:
            return {}
        return _scores(retrieval, zeroshot if classifier is not None else None)

    @torch.no_grad()
    def _lockstep_forward(self, empty_batch: dict) -> None:
        # A model whose parameters are sharded (FSDP2) or partitioned (ZeRO-3) gathers them inside
        # every forward, a collective: a rank whose batch was all bad still runs one, on a one-row
        # dummy of the batch's shape (a transformer cannot run zero rows); the result is dropped.
        ops = parallel_ops(self)
        if ops.shards_parameters or ops.partitions_parameters:
            self.model(*one_row_like(empty_batch["images"], empty_batch["texts"]))

    def _eval_class_names(self, split: str) -> list[str] | None:
        # The data module's source for the split (a DataLoader wraps it in batch fetchers).
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return getattr(getattr(datamodule, split, None), "class_names", None)

    def _eval_step(self, batch: dict, split: str) -> None:
        if batch["images"].shape[0] == 0:  # every sample of the batch was bad
            self._lockstep_forward(batch)
            return
        out = self.forward(batch["images"], batch["texts"])
        with D.local_only():  # ranks may run different numbers of eval batches
            terms = self.compute_loss(out, batch)
        bs = int(batch["images"].shape[0])
        self.log(f"{split}/loss", loss_total(terms), batch_size=bs, sync_dist=True)
        features = self.eval_features(out, batch, split)
        _update_scores(self._retrieval[split], self._zeroshot[split], self._classifier, features, batch)
        self.update_eval_metrics(features, batch, split)

    def _log_eval_metrics(self, split: str) -> None:
        # Already identical on every rank (computed over the gathered split).
        log_gathered(self, {f"{split}/{name}": value.float() for name, value in self.eval_metrics(split).items()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    # -- prediction --------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """Normalised image and text embeddings with each row's index (written by
        ``mmkit.callbacks.EmbeddingWriter``)."""
        out = self.forward(batch["images"], batch["texts"])  # the model's forward: FSDP2 gathers its root there
        return {
            "image_features": out["image_features"].float(),
            "text_features": out["text_features"].float(),
            "index": batch["index"],
            "image_id": batch["image_id"],
        }

    # -- optimisation ------------------------------------------------------------------------
    def _adamw(self, groups: list[dict]) -> torch.optim.AdamW:
        """AdamW over ``groups`` as every technique builds it: torch's fused kernel where it has one;
        under FSDP2 sharded and replicated parameters in separate groups (torch's fused and foreach
        kernels take one kind of tensor per group)."""
        groups = parallel_ops(self).optimizer_groups(groups)
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=self._fused(groups))

    def _fused(self, groups: list[dict]) -> bool | None:
        # fp16 with a gradient scaler: torch's default, so Lightning's scaler and clipping work as usual.
        fp16 = self._trainer is not None and str(self.trainer.precision).startswith("16")
        return None if fp16 else fused_adamw_supported(groups)

    def configure_optimizers(self):
        # Every trainable parameter of the module: the model's, and a loss's own (e.g. a learned
        # projection); frozen ones (locked towers, a teacher) are left out by param_groups.
        opt = self._adamw(param_groups(self, self.weight_decay))
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError(
                "the learning-rate schedule needs a length: set trainer.max_steps (or max_epochs), "
                "also when training is bounded by trainer.max_time"
            )
        total = int(total)
        sched = warmup_cosine(opt, self.warmup_steps, total, self.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export ------------------------------------------------------------------------------
    def on_train_end(self) -> None:
        # Not on_fit_end: Lightning tears the strategy down before that hook (the model moved to
        # the CPU), and the sharded strategies' gather below is an NCCL collective on GPU tensors.
        if self.export_dir == "":
            return
        out = Path(self.export_dir) if self.export_dir else run_folder(self.trainer) / "export"  # every rank
        model = self.model
        state = parallel_ops(self).full_state_dict(model)  # sharded: a collective; DeepSpeed: fp32 master weights
        if state is not None and self.trainer.is_global_zero:
            model = self.spec.build()  # an unsharded copy to write from
            model.load_state_dict(state)
        if not self.trainer.is_global_zero:
            return
        model.export(out)
        give_folder_usual_modes(out)
        print(f"mmkit: exported the trained model to {out}")
