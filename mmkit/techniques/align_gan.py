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
manages breaks DDP's reducer (it expects each of them to get a gradient in every backward). D's
gradients are averaged by ``mmkit.parallel.ops`` instead (``after_backward``, as for every
parameter a strategy leaves unreduced), and its weights and spectral-norm vectors are copied from
rank 0 when fitting starts, so D stays identical on every rank. The adversarial losses are normalised by the global batch (exact across ranks).

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
from mmkit.parallel.ops import parallel_ops
from mmkit.techniques.base import DualEncoderModule, loss_total
from mmkit.training.optim import param_groups, warmup_cosine

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
        self._critic_stats: dict[str, Tensor] = {}  # the step's D statistics (alternating mode)
        self._gap = {"val": ModalityGap(), "test": ModalityGap()}
        self._d_scores: dict[str, tuple[list[Tensor], list[Tensor]]] = {"val": ([], []), "test": ([], [])}

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.mode == "alternating" and not parallel_ops(self).supports_several_optimizers:
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
        # Rank 0's D (weights and spectral-norm vectors) on every rank: DDP, which does this for
        # the parameters it manages, does not manage D.
        if distributed.world_size() > 1:
            parallel_ops(self).broadcast_replicated_(self.discriminator)

    def _sync_discriminator_buffers(self) -> None:
        """Once per training step: D's spectral-norm vectors to rank 0's, as DDP's buffer broadcast
        does for the modules it manages. Each rank's power iteration runs on identical weights,
        but a BLAS may round a matrix-vector product differently with the operands' memory
        alignment (Intel's MKL does), so the vectors would drift apart in their last bits."""
        distributed.broadcast_from_rank_zero_(list(self.discriminator.buffers()))

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
        (a non-finite ``d_loss`` on some rank stops them, and the base step then skips the
        encoders' step as well)."""
        image, text = outputs["image_features"].detach(), outputs["text_features"].detach()
        ops = parallel_ops(self)
        stats: dict[str, Tensor] = {}
        for _ in range(self.n_critic):
            terms = self.adversarial.discriminator_terms(self.discriminator, image, text)
            d_total = loss_total(terms)
            stats = {k: v.detach() for k, v in terms.items()}
            if not self._all_ranks_finite(d_total.detach()):
                d_opt.zero_grad(set_to_none=True)
                return stats  # the base step's check, over every rank, then skips the step
            self.manual_backward(d_total)
            ops.after_backward(self.discriminator.parameters())  # D is outside DDP: averaged here
            ops.clip_gradients(d_opt, self.d_grad_clip_norm)
            # Through the strategy (precision plugin: AMP unscaling) but not LightningOptimizer.step,
            # which would count D steps in trainer.global_step.
            self.trainer.strategy.optimizer_step(d_opt.optimizer, closure=lambda: None)
            d_opt.zero_grad(set_to_none=True)
        return stats

    def training_loss(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        if self.mode == "gradient_reversal":
            self.grl.set_progress(self.global_step / max(1, int(self.trainer.estimated_stepping_batches)))
            return {**self._reversal_loss(outputs, batch), "grl_weight": torch.tensor(self.grl.weight)}
        # D first, on this batch: the encoders then face the updated D.
        self._critic_stats = self._critic_steps(outputs, self.optimizers()[1])
        return self.compute_loss(outputs, batch)

    def loss_parameters(self) -> list[Tensor]:
        # A paired loss's own parameters; D learns in its own steps (or through the reversal layer).
        d_ids = {id(p) for p in self.discriminator.parameters()}
        return [p for p in super().loss_parameters() if id(p) not in d_ids]

    def after_backward(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        # Every D forward of this step ran its power iteration (see _sync_discriminator_buffers).
        self._sync_discriminator_buffers()
        stats, self._critic_stats = self._critic_stats, {}
        return stats

    # -- evaluation --------------------------------------------------------------------------
    def on_eval_start(self, split: str) -> None:
        super().on_eval_start(split)
        self._gap[split] = self._gap[split].to(self.device)
        self._gap[split].reset()
        self._d_scores[split] = ([], [])

    @torch.no_grad()
    def update_eval_metrics(self, features: dict[str, Tensor], batch: dict, split: str) -> None:
        image, text = features["image_features"], features["text_features"]
        self._gap[split].update(image, text)
        self._d_scores[split][0].append(self.discriminator(image).float())
        self._d_scores[split][1].append(self.discriminator(text).float())

    def eval_metrics(self, split: str) -> dict[str, Tensor]:
        # All computed over the whole split (every rank's rows), so identical on every rank.
        metrics = super().eval_metrics(split)
        metrics["modality_gap"] = self._gap[split].compute().float()
        return {**metrics, **self._discriminator_metrics(split)}

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
