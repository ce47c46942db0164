"""AlignGAN: adversarial modality alignment of a dual encoder.

A modality discriminator D scores the encoders' normalised features as image-like or text-like;
the encoders are trained to make it fail, which pulls the two embedding distributions together
(closes the "modality gap"). Fooling D says nothing about *which* caption goes with which image,
so the adversarial term is added to a paired alignment loss (InfoNCE by default).

Two ways to train the two players:

- ``mode: alternating`` (default): two optimizers, Lightning manual optimisation. Each training
  step first takes ``n_critic`` D steps on the *same batch's* features, detached (each with fresh
  gradient-penalty interpolates and dropout), then one encoder step on ``align_weight · paired +
  adv_weight · generator loss`` through the updated D. Taking the critic steps on the same batch
  keeps ``max_steps``, epochs, the learning-rate schedule and validation intervals counting
  encoder steps, and every batch still trains the encoders; ``trainer.global_step`` counts
  encoder steps only (D steps are not Lightning optimizer steps).
- ``mode: gradient_reversal``: one optimizer, one backward. The features pass through a gradient
  reversal layer into D; D descends its loss and the encoders receive the reversed gradient,
  scaled by ``adv_weight`` × a schedule over training progress (DANN ramp by default). There
  ``train/loss`` is the one objective both players share: paired loss + D's loss.

Under DDP, D's parameters are left out of DDP (``_ddp_params_and_buffers_to_ignore``): D is
trained on detached features, and a backward that reaches only some of the parameters DDP
manages breaks DDP's reducer (it expects each of them to get a gradient in every backward). D's gradients are averaged here instead (through ``mmkit.distributed``), and its
weights and spectral-norm vectors are copied from rank 0 when fitting starts, so D stays identical
on every rank. The adversarial losses are normalised by the global batch (exact across ranks).

Under FSDP2 (``ModelParallelStrategy``) both modes run: the encoders are sharded, D stays
replicated (a small MLP on the embeddings: sharding it would save nothing) and is kept identical
on every rank exactly as under DDP (broadcast at the start, gradients averaged here).

Under DeepSpeed only ``mode: gradient_reversal`` runs (Lightning's ``DeepSpeedStrategy`` takes one
optimizer): there D is inside the engine like the encoders, so DeepSpeed reduces (and under ZeRO
partitions) its gradients and weights; mmkit then only copies D's spectral-norm buffers from rank 0.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from mmkit import distributed
from mmkit.config_checks import Range, check_settings
from mmkit.losses.adversarial import AdversarialLoss, discriminator_accuracy, discriminator_auc
from mmkit.losses.contrastive import ClipLoss
from mmkit.losses.protocol import as_loss, scale_terms
from mmkit.metrics.modality_gap import ModalityGap
from mmkit.models.discriminator import ModalityDiscriminator
from mmkit.models.gradient_reversal import SCHEDULES, GradientReversal
from mmkit.models.spec import ModelSpec
from mmkit.parallel import deepspeed_support as ds
from mmkit.techniques.base import DualEncoderModule, loss_total
from mmkit.training.grad_cache import chunked_backward
from mmkit.training.optim import param_groups, warmup_cosine
from mmkit.parallel.fsdp2_sharding import average_replicated_grads, is_sharded

MODES = ("alternating", "gradient_reversal")


class AlignGAN(DualEncoderModule):
    """Dual encoder + modality discriminator (see module docstring).

    Args:
        model: the model spec (e.g. ``mmkit.models.OpenCLIP``).
        loss: the paired alignment loss, any loss of the loss protocol or a list of them
            (default ``mmkit.losses.ClipLoss``).
        objective: adversarial objective: ``bce`` (non-saturating cross-entropy), ``wgan-gp``
            (Wasserstein critic with gradient penalty) or ``hinge``.
        adv_weight: weight of the adversarial term in the encoders' loss (in
            ``gradient_reversal`` mode: the reversal weight the schedule ramps up to). 0 gives the
            plain paired baseline; D is still trained, as a probe of the modality gap.
        align_weight: weight of the paired loss's ``*_loss`` terms; 0 gives the pure-adversarial
            setting (for study: fooling D does not pair images with their captions).
        mode: ``alternating`` (two optimizers) or ``gradient_reversal`` (one optimizer).
        n_critic: D steps per encoder step (``alternating``), all on the same batch.
        gp_weight: gradient-penalty weight (None: 10 for ``wgan-gp``, off otherwise; a positive
            value adds the penalty to any objective).
        d_hidden_dim: width of D's hidden layers.
        d_depth: number of D's hidden layers.
        d_dropout: dropout in D.
        spectral_norm: spectrally normalise D's linear layers.
        d_lr: D's learning rate (Adam; constant in ``alternating`` mode, on the encoders'
            warmup + cosine schedule in ``gradient_reversal`` mode).
        d_betas: D's Adam betas (GANs commonly use a low β1, e.g. 0.5).
        d_weight_decay: D's weight decay (Adam's L2 penalty in ``alternating`` mode, decoupled
            as in the shared AdamW in ``gradient_reversal`` mode).
        d_grad_clip_norm: clip D's gradient norm to this (None: no clipping).
        grl_schedule: reversal weight schedule: ``dann`` (2/(1+exp(−γp))−1), ``linear``, ``constant``.
        grl_gamma: steepness γ of the ``dann`` schedule.
        **kwargs: optimisation and evaluation settings of ``DualEncoderModule`` (they apply to
            the encoders' AdamW).
    """

    setting_ranges = {
        "adv_weight": Range(ge=0),
        "align_weight": Range(ge=0),
        "n_critic": Range(ge=1, integer=True),
        "gp_weight": Range(ge=0, none="10 for wgan-gp, off otherwise"),
        "d_hidden_dim": Range(ge=1, integer=True),
        "d_depth": Range(ge=0, integer=True),
        "d_dropout": Range(ge=0, lt=1),
        "d_lr": Range(gt=0),
        "d_betas": Range(ge=0, lt=1, length=2),
        "d_weight_decay": Range(ge=0),
        "d_grad_clip_norm": Range(gt=0, none="no clipping"),
        "grl_gamma": Range(gt=0),
    }

    def __init__(
        self,
        model: ModelSpec,
        loss: nn.Module | list[nn.Module] | None = None,
        objective: str = "bce",
        adv_weight: float = 0.1,
        align_weight: float = 1.0,
        mode: str = "alternating",
        n_critic: int = 1,
        gp_weight: float | None = None,
        d_hidden_dim: int = 256,
        d_depth: int = 2,
        d_dropout: float = 0.0,
        spectral_norm: bool = True,
        d_lr: float = 2e-4,
        d_betas: tuple[float, float] = (0.5, 0.999),
        d_weight_decay: float = 0.0,
        d_grad_clip_norm: float | None = None,
        grl_schedule: str = "dann",
        grl_gamma: float = 10.0,
        **kwargs,
    ) -> None:
        check_settings(self, locals(), AlignGAN.setting_ranges)
        super().__init__(model, **kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if grl_schedule not in SCHEDULES:
            raise ValueError(f"grl_schedule must be one of {SCHEDULES}, got {grl_schedule!r}")
        if mode == "gradient_reversal" and self.accumulate_chunks > 1:
            raise ValueError("accumulate_chunks > 1 needs mode: alternating (the chunked backward only reaches the features)")
        self.loss = as_loss(loss, default=ClipLoss)
        self.adversarial = AdversarialLoss(objective, gp_weight)
        self.adv_weight, self.align_weight = adv_weight, align_weight
        self.mode, self.n_critic = mode, n_critic
        self.d_hidden_dim, self.d_depth, self.d_dropout, self.spectral_norm = d_hidden_dim, d_depth, d_dropout, spectral_norm
        self.d_lr, self.d_betas, self.d_weight_decay = d_lr, tuple(d_betas), d_weight_decay
        self.d_grad_clip_norm = d_grad_clip_norm
        self.grl = GradientReversal(grl_schedule, grl_gamma, max_weight=adv_weight)
        self.discriminator: ModalityDiscriminator | None = None
        self._gap = {"val": ModalityGap(), "test": ModalityGap()}
        self._d_scores: dict[str, tuple[list[Tensor], list[Tensor]]] = {"val": ([], []), "test": ([], [])}

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if ds.deepspeed_strategy(self) is not None and self.mode == "alternating":
            raise ValueError(
                "AlignGAN mode: alternating needs two optimizers, and Lightning's DeepSpeedStrategy "
                "supports one: under DeepSpeed use mode: gradient_reversal (one optimizer, D trained "
                "through a gradient reversal layer), or keep mode: alternating with strategy: ddp"
            )
        super().configure_model()
        if self.discriminator is None:
            # Its input width is the model's embedding width, known only once the model exists.
            self.discriminator = ModalityDiscriminator(
                self.model.embed_dim, self.d_hidden_dim, self.d_depth, self.d_dropout, self.spectral_norm
            )
        # DDP must not manage D (see module docstring); names as in this module's state_dict.
        self._ddp_params_and_buffers_to_ignore = [f"discriminator.{k}" for k in self.discriminator.state_dict()]

    def on_fit_start(self) -> None:
        self._broadcast_discriminator()

    @torch.no_grad()
    def _broadcast_discriminator(self) -> None:
        """Copy rank 0's D (weights and spectral-norm vectors) to every rank: DDP, which does
        this for the parameters it manages, does not manage D."""
        if distributed.world_size() == 1:
            return
        # DeepSpeed broadcast the parameters it holds when it built its engine (and keeps their
        # master copy apart, which a copy here would miss); not the spectral-norm buffers.
        tensors = [p.data for p in self.discriminator.parameters() if not ds.is_deepspeed_param(p)]
        distributed.broadcast_from_rank_zero_(tensors + list(self.discriminator.buffers()))

    def _sync_discriminator_buffers(self) -> None:
        """Once per training step: D's spectral-norm vectors to rank 0's, as DDP's buffer broadcast
        does for the modules it manages. Each rank's power iteration runs on identical weights,
        but a BLAS may round a matrix-vector product differently with the operands' memory
        alignment (Intel's MKL does), so the vectors would drift apart in their last bits."""
        distributed.broadcast_from_rank_zero_(list(self.discriminator.buffers()))

    def _sync_discriminator_grads(self) -> None:
        """Average D's gradients over ranks, as DDP does for the parameters it manages."""
        if distributed.world_size() == 1 or ds.holds(self.discriminator):
            return  # DeepSpeed (gradient_reversal mode) holds D and has already averaged them
        params = [p for p in self.discriminator.parameters() if p.grad is not None]
        if not params:
            return
        flat = distributed.all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in params])) / distributed.world_size()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    @contextlib.contextmanager
    def _discriminator_frozen(self):
        # The encoders' loss goes through D, but must not leave gradients on D's parameters.
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # -- training ----------------------------------------------------------------------------
    def _paired_terms(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        return scale_terms(super().compute_loss(outputs, batch), self.align_weight)

    def compute_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """The encoders' objective: ``align_weight · paired + adv_weight · generator loss``."""
        terms = self._paired_terms(outputs, batch)
        with self._discriminator_frozen():
            adv = self.adversarial.generator_terms(self.discriminator, outputs["image_features"], outputs["text_features"])
        terms["adversarial_loss"] = self.adv_weight * adv["adversarial_loss"]
        return terms

    def _reversal_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """One objective for both players: D's loss on features behind the reversal layer."""
        terms = self._paired_terms(outputs, batch)
        image, text = self.grl(outputs["image_features"]), self.grl(outputs["text_features"])
        terms.update(self.adversarial.discriminator_terms(self.discriminator, image, text))
        return terms

    def _critic_steps(self, outputs: dict[str, Tensor], d_opt) -> dict[str, Tensor]:
        """``n_critic`` D steps on the batch's detached features; returns the last step's terms
        (``d_nonfinite`` = 1 when a step was skipped for a NaN/inf loss on some rank)."""
        image, text = outputs["image_features"].detach(), outputs["text_features"].detach()
        stats: dict[str, Tensor] = {}
        for _ in range(self.n_critic):
            terms = self.adversarial.discriminator_terms(self.discriminator, image, text)
            d_total = loss_total(terms)
            if not self._all_ranks_finite(d_total.detach()):
                d_opt.zero_grad(set_to_none=True)
                return {**{k: v.detach() for k, v in terms.items()}, "d_nonfinite": torch.ones(())}
            self.manual_backward(d_total)
            self._sync_discriminator_grads()
            if self.d_grad_clip_norm:
                self.clip_gradients(d_opt, gradient_clip_val=self.d_grad_clip_norm, gradient_clip_algorithm="norm")
            # Through the strategy (precision plugin: AMP unscaling) but not LightningOptimizer.step,
            # which would count D steps in trainer.global_step.
            self.trainer.strategy.optimizer_step(d_opt.optimizer, closure=lambda: None)
            d_opt.zero_grad(set_to_none=True)
            stats = {k: v.detach() for k, v in terms.items()}
        return stats

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if batch["images"].shape[0] == 0 and distributed.world_size() == 1:
            return None  # every sample of this batch was bad (counted by the data layer)
        if self.mode == "alternating":
            opt, d_opt = self.optimizers()
        else:
            opt, d_opt = self.optimizers(), None
            self.grl.set_progress(self.global_step / max(1, int(self.trainer.estimated_stepping_batches)))
        d_stats: dict[str, Tensor] = {}

        def loss_fn(**outputs) -> dict[str, Tensor]:
            if d_opt is None:
                return self._reversal_loss(outputs, batch)
            d_stats.update(self._critic_steps(outputs, d_opt))  # D first: the encoders face the updated D
            return self.compute_loss(outputs, batch)

        if self.accumulate_chunks > 1:
            d_ids = {id(p) for p in self.discriminator.parameters()}
            terms = chunked_backward(
                self.forward, loss_fn, batch["images"], batch["texts"], self.accumulate_chunks,
                self.manual_backward, self._no_sync,
                # a paired loss's own parameters; D learns in its own steps, not from this loss
                params=[p for p in self._parameters_outside_model() if id(p) not in d_ids],
            )
        else:
            terms = loss_fn(**self.forward(batch["images"], batch["texts"]))
            self.manual_backward(loss_total(terms))
            terms = {k: v.detach() for k, v in terms.items()}
        total = loss_total(terms).detach()

        self._sync_discriminator_buffers()  # every D forward of this step ran its power iteration
        bad_d = d_stats.pop("d_nonfinite", None) is not None
        if bad_d or not self._all_ranks_finite(total):
            self._skip_step(opt, {**terms, **d_stats})
            return total
        self._consecutive_nonfinite = 0
        if d_opt is None:
            self._sync_discriminator_grads()  # D learns from the same backward, outside DDP
        if is_sharded(self.model):
            average_replicated_grads(self.model)
        if self.grad_clip_norm:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        ds.clamp_logit_scale(self.model, self.max_logit_scale)  # DeepSpeed: its fp32 master copy too
        stats = {**terms, **d_stats}
        if d_opt is None:
            stats["grl_weight"] = torch.tensor(self.grl.weight)
        self._log_train(stats, total, batch)
        self.lr_schedulers().step()
        return total

    # -- evaluation --------------------------------------------------------------------------
    def _prepare_eval(self, split: str) -> None:
        super()._prepare_eval(split)
        self._gap[split] = self._gap[split].to(self.device)
        self._gap[split].reset()
        self._d_scores[split] = ([], [])

    @torch.no_grad()
    def _update_eval_metrics(self, outputs: dict[str, Tensor], batch: dict, split: str) -> None:
        image, text = outputs["image_features"], outputs["text_features"]
        self._gap[split].update(image, text)
        self._d_scores[split][0].append(self.discriminator(image).float())
        self._d_scores[split][1].append(self.discriminator(text).float())

    def _eval_epoch_end(self, split: str) -> None:
        super()._eval_epoch_end(split)
        # All computed over the whole split (every rank's rows), so identical on every rank.
        metrics = {"modality_gap": self._gap[split].compute().float(), **self._discriminator_metrics(split)}
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, rank_zero_only=False, sync_dist=False)

    def _discriminator_metrics(self, split: str) -> dict[str, Tensor]:
        """D's accuracy and ROC AUC over the split (0.5: the modalities are indistinguishable)."""
        image, text = (
            distributed.all_gather_no_grad(torch.cat(p) if p else torch.empty(0, device=self.device))
            for p in self._d_scores[split]
        )
        # A critic's values (wgan-gp) have no fixed origin: split at the midpoint of the two means.
        threshold = self.adversarial.threshold(image, text) if image.numel() and text.numel() else 0.0
        return {"d_accuracy": discriminator_accuracy(image, text, threshold), "d_auc": discriminator_auc(image, text)}

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        d_params = list(self.discriminator.parameters())
        d_ids = {id(p) for p in d_params}
        # The encoders' groups: every trainable parameter of the module but D's (the model's,
        # the paired loss's own), with the base's weight-decay exemptions.
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in d_ids]}
            for g in param_groups(self, self.weight_decay)
        ]
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the learning-rate schedule needs a length: set trainer.max_steps (or max_epochs)")
        total = int(total)
        if self.mode == "gradient_reversal":
            groups.append({"params": d_params, "lr": self.d_lr, "betas": self.d_betas, "weight_decay": self.d_weight_decay})
            opt = self._adamw(groups)
            sched = warmup_cosine(opt, self.warmup_steps, total, self.min_lr_ratio)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        opt = self._adamw(groups)
        d_opt = torch.optim.Adam(d_params, lr=self.d_lr, betas=self.d_betas, weight_decay=self.d_weight_decay,
                                 fused=self._fused([{"params": d_params}]))
        sched = warmup_cosine(opt, self.warmup_steps, total, self.min_lr_ratio)
        return [opt, d_opt], [{"scheduler": sched, "interval": "step"}]
