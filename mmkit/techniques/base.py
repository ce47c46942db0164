"""The one shared base of mmkit's LightningModules: a dual encoder trained on image–text batches.

It owns what every technique needs: building the model in ``configure_model`` (so FSDP/DeepSpeed
can shard it), the manual optimisation step (exact chunked accumulation, gradient clipping,
non-finite-loss skipping, temperature clamping), retrieval / zero-shot evaluation, embedding
prediction and export. A technique subclass provides ``compute_loss`` and whatever else is its own.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from mmkit import distributed as D
from mmkit.config_checks import Range, check_settings
from mmkit.metrics.retrieval import RetrievalMetrics
from mmkit.metrics.zeroshot import ZeroShotAccuracy, build_zeroshot_classifier, zero_shot_class_names
from mmkit.models.dual_encoder import MAX_LOGIT_SCALE, DualEncoder
from mmkit.models.spec import ModelSpec
from mmkit.parallel import deepspeed_support as ds
from mmkit.training.grad_cache import chunked_backward
from mmkit.training.optim import fused_adamw_supported, param_groups, warmup_cosine
from mmkit.parallel.fsdp2_sharding import (
    average_replicated_grads, clip_grad_norm_, full_state_dict, is_sharded, shard_dual_encoder,
    split_replicated_groups,
)
from mmkit.run_folder import run_folder


class NonFiniteLossError(RuntimeError):
    pass


def loss_total(terms: dict[str, Tensor]) -> Tensor:
    """Sum of the ``*_loss`` terms; other entries of a loss's dict are statistics, only logged."""
    return sum(v for k, v in terms.items() if k.endswith("_loss"))


class DualEncoderModule(L.LightningModule):
    """Shared training/evaluation machinery (see module docstring).

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
        self.nonfinite_steps = 0
        self._consecutive_nonfinite = 0
        self._retrieval = {"val": RetrievalMetrics(), "test": RetrievalMetrics()}
        self._zeroshot = {"val": ZeroShotAccuracy(), "test": ZeroShotAccuracy()}
        self._classifier: Tensor | None = None
        self.save_hyperparameters(ignore=["model", "loss"])

    # -- model -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Lightning's own DeepSpeedStrategy would build this module wrongly: refused, with an error
        # naming mmkit's (mmkit.parallel.deepspeed_strategy). A subclass must call super().setup(stage).
        from mmkit.parallel.deepspeed_strategy import require_mmkit_deepspeed

        require_mmkit_deepspeed(self.trainer.strategy)

    def configure_model(self) -> None:
        # Idempotent: Lightning may call it more than once, and the model may be built earlier.
        if self.model is None:
            self.model = self.spec.build()
        if self.device_mesh is not None and not is_sharded(self.model):  # ModelParallelStrategy: FSDP2
            shard_dual_encoder(self.model, self.device_mesh["data_parallel"])

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
        detached statistics, logged but not optimised)."""
        raise NotImplementedError

    def add_penalty_gradients(self) -> dict[str, Tensor]:
        """Hook for parameter-space penalties (e.g. EWC): add their gradient to ``p.grad`` directly
        (after the data loss's backward and DDP's all-reduce; the penalty must be the same on every
        rank) and return their values as named ``*_loss`` terms. Default: none."""
        return {}

    def backward_penalty_terms(self) -> dict[str, Tensor]:
        """Hook for parameter-space penalties that must go through the backward pass instead
        (DeepSpeed ZeRO, whose backward reduces and partitions the gradients, so nothing can be
        added to ``p.grad`` afterwards): named ``*_loss`` terms, differentiable in the parameters
        and the same on every rank. Added to the loss of a plain step; with ``accumulate_chunks``
        back-propagated once more inside the step's single gradient reduction. Default: none."""
        return {}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if batch["images"].shape[0] == 0 and D.world_size() == 1:
            return None  # every sample of this batch was bad (counted by the data layer)
        opt = self.optimizers()
        engine = self.trainer.strategy.model if self._trainer is not None else None
        penalty = self.backward_penalty_terms()
        with ds.coalesced_backward(engine, self.accumulate_chunks):  # DeepSpeed: one reduction for all chunks
            if penalty and self.accumulate_chunks > 1 and loss_total(penalty).requires_grad:
                with self._no_sync():  # reduced with the chunks' gradients (DDP: by the last chunk)
                    self.manual_backward(loss_total(penalty))
            terms = chunked_backward(
                self.forward,
                lambda **out: self.compute_loss(out, batch),
                batch["images"],
                batch["texts"],
                self.accumulate_chunks,
                self.manual_backward,
                self._no_sync,
                params=self._parameters_outside_model(),
            ) if self.accumulate_chunks > 1 else self._plain_backward(batch, penalty)
        terms.update({k: v.detach() for k, v in penalty.items()})
        terms.update(self.add_penalty_gradients())
        total = loss_total(terms).detach()

        if not self._all_ranks_finite(total):
            self._skip_step(opt, terms)
            return total
        self._consecutive_nonfinite = 0
        if is_sharded(self.model):  # the temperature and modules beside the model (heads, a loss's projection)
            average_replicated_grads(self)
        if self.grad_clip_norm:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        ds.clamp_logit_scale(self.model, self.max_logit_scale)  # DeepSpeed: its fp32 master copy too
        self._log_train(terms, total, batch)  # before the scheduler moves on: logs the LR this step used
        self.lr_schedulers().step()
        return total

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if by_norm and self.model is not None and is_sharded(self.model):
            # FSDP2: torch's clip refuses sharded gradients mixed with replicated non-scalar ones
            # (MetricAlign's heads, a loss's projection, AlignGAN's D): clip them as one norm here.
            clip_grad_norm_(params, gradient_clip_val)
            return
        if by_norm and not ds.holds(self.model) and getattr(optimizer, "defaults", {}).get("fused"):
            # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (made for
            # fp16's scaler, which the fused kernel unscales itself); fused is never chosen with
            # fp16 (configure_optimizers), so the gradients here are unscaled: clip them directly.
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _parameters_outside_model(self) -> list[Tensor]:
        # Trainable parameters a loss owns (e.g. KD's learned projection): chunked accumulation
        # must back-propagate the loss into them as well as into the model.
        in_model = {id(p) for p in self.model.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in in_model]

    def _plain_backward(self, batch: dict, penalty: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        terms = self.compute_loss(self.forward(batch["images"], batch["texts"]), batch)
        self.manual_backward(loss_total(terms) + loss_total(penalty or {}))
        return {k: v.detach() for k, v in terms.items()}

    def _no_sync(self):
        ddp = self.trainer.strategy.model if self._trainer is not None else None
        return ds.no_sync(ddp)  # DDP's no_sync; under DeepSpeed ZeRO, coalesced_backward defers instead

    def _all_ranks_finite(self, total: Tensor) -> bool:
        # All ranks must agree to skip, or DDP would deadlock on the next all-reduce.
        bad = torch.tensor([0.0 if torch.isfinite(total) else 1.0], device=total.device)
        return D.all_reduce_sum(bad).item() == 0

    def _skip_step(self, opt, terms: dict[str, Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), rank_zero_only=True)
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            bad = [k for k, v in terms.items() if k.endswith("_loss") and not torch.isfinite(v)]
            raise NonFiniteLossError(
                f"loss was non-finite for {self._consecutive_nonfinite} consecutive steps "
                f"(last at global step {self.global_step}, batch {self.trainer.fit_loop.batch_idx}); "
                f"non-finite terms on this rank: {bad or 'none (another rank)'}; "
                "lower the learning rate or check the data"
            )

    def _log_train(self, terms: dict[str, Tensor], total: Tensor, batch: dict) -> None:
        bs = int(batch["images"].shape[0])
        for name, value in terms.items():  # loss terms and the losses' own statistics
            self.log(f"train/{name}", value.float(), batch_size=bs, sync_dist=False)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        scale = self.model.log_scale_parameter().exp().detach()
        self.log("train/temperature", 1.0 / scale, batch_size=bs)
        self.log("train/logit_scale", scale, batch_size=bs)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True, batch_size=bs)

    # -- evaluation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._prepare_eval("val")

    def on_test_epoch_start(self) -> None:
        self._prepare_eval("test")

    def _prepare_eval(self, split: str) -> None:
        self._retrieval[split] = self._retrieval[split].to(self.device)
        self._retrieval[split].reset()
        self._zeroshot[split] = self._zeroshot[split].to(self.device)
        self._zeroshot[split].reset()
        self._classifier = None
        class_names = zero_shot_class_names(self.zero_shot_classes, self._eval_class_names(split), f"{split} data")
        if class_names:
            tokenize = self.preprocessing.tokenize

            def encode(prompts: list[str]) -> Tensor:
                tokens = tokenize(prompts)
                tokens = {k: v.to(self.device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(self.device)
                # Through the model's own forward (not encode_text): FSDP2 gathers the root there.
                return self.project({"text_features": self.model(None, tokens)["text_features"]})["text_features"]

            # ZeRO-3 gathers parameters only inside a module's forward; this runs outside any.
            with torch.no_grad(), ds.gathered(self):
                self._classifier = build_zeroshot_classifier(class_names, self.zero_shot_templates, encode)

    def _eval_class_names(self, split: str) -> list[str] | None:
        # The data module's source for the split (a DataLoader wraps it in batch fetchers).
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return getattr(getattr(datamodule, split, None), "class_names", None)

    def _eval_step(self, batch: dict, split: str) -> None:
        if batch["images"].shape[0] == 0:
            return
        out = self.forward(batch["images"], batch["texts"])
        with D.local_only():  # ranks may run different numbers of eval batches
            terms = self.compute_loss(out, batch)
        bs = int(batch["images"].shape[0])
        self.log(f"{split}/loss", loss_total(terms), batch_size=bs, sync_dist=True)
        self._retrieval[split].update(out["image_features"], out["text_features"], batch["image_id"], batch.get("index"))
        if self._classifier is not None and "label" in batch:
            self._zeroshot[split].update(out["image_features"], batch["label"], self._classifier)
        self._update_eval_metrics(out, batch, split)

    def _update_eval_metrics(self, outputs: dict[str, Tensor], batch: dict, split: str) -> None:
        """Hook: feed a technique's own evaluation metrics with an eval batch's model outputs
        (reset them in ``_prepare_eval``, log them in ``_eval_epoch_end``). Default: none."""

    def _eval_epoch_end(self, split: str) -> None:
        metrics = self._retrieval[split].compute()
        if self._classifier is not None:
            metrics.update({f"zeroshot_{k}": v for k, v in self._zeroshot[split].compute().items()})
        for name, value in metrics.items():
            # Already identical on every rank (computed over the gathered split).
            self.log(f"{split}/{name}", value.float(), rank_zero_only=False, sync_dist=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

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
        if self.model is not None and is_sharded(self.model):
            groups = split_replicated_groups(groups)
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
        if is_sharded(model) or ds.holds(model):
            # A collective: every rank takes part. DeepSpeed: its fp32 master weights.
            state = full_state_dict(model) if is_sharded(model) else ds.full_state_dict(model)
            if self.trainer.is_global_zero:
                model = self.spec.build()  # an unsharded copy to write from
                model.load_state_dict(state)
        if not self.trainer.is_global_zero:
            return
        model.export(out)
        print(f"mmkit: exported the trained model to {out}")
