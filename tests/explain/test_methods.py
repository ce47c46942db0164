"""Every method's maps: shapes, value ranges, determinism, batch independence; occlusion against
a direct computation; unsupported towers refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkit.explain import (
    METHODS,
    UnsupportedTowerError,
    explain_pairs,
    normalize_relevance,
)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_ranges_and_padding(tiny, tiny_batch, method):
    model, _ = tiny
    images, texts = tiny_batch
    exp = explain_pairs(model, images, texts, method)
    assert exp.patches.shape == (4, 2, 2) and exp.tokens.shape == texts.shape and exp.scores.shape == (4,)
    assert torch.isfinite(exp.patches).all() and torch.isfinite(exp.tokens).all()
    assert exp.patches.abs().sum() > 0 and exp.tokens.abs().sum() > 0
    if method == "attention":
        assert (exp.patches >= 0).all() and (exp.tokens >= 0).all()
    eot = texts.argmax(-1)
    for b in range(4):  # padding after the end-of-text token the tower pools carries no relevance
        assert exp.valid_tokens[b].sum() == eot[b] + 1
        assert (exp.tokens[b, eot[b] + 1:] == 0).all()
    shown = normalize_relevance(exp.patches)
    assert shown.min() >= 0 and shown.max() <= 1 and torch.allclose(shown.flatten(1).amax(1), torch.ones(4))
    with torch.no_grad():
        direct = (F.normalize(model.encode_image(images), dim=-1) * F.normalize(model.encode_text(texts), dim=-1)).sum(-1)
    assert torch.allclose(exp.scores, direct, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deterministic_and_independent_of_the_batch(tiny, tiny_batch, method):
    model, _ = tiny
    images, texts = tiny_batch
    model.train()  # explain_pairs evaluates in eval mode and restores the mode
    first = explain_pairs(model, images, texts, method)
    again = explain_pairs(model, images, texts, method)
    alone = explain_pairs(model, images[2:3], texts[2:3], method)
    assert model.training
    assert torch.equal(first.patches, again.patches) and torch.equal(first.tokens, again.tokens)
    assert torch.allclose(alone.patches[0], first.patches[2], atol=1e-6)
    assert torch.allclose(alone.tokens[0], first.tokens[2], atol=1e-6)


def test_occlusion_equals_the_score_drop_computed_directly(tiny, tiny_batch):
    model, _ = tiny
    images, texts = tiny_batch
    exp = explain_pairs(model, images, texts, "occlusion")

    def score(img, txt_features):
        return (F.normalize(model.encode_image(img), dim=-1) * txt_features).sum(-1)

    with torch.no_grad():
        text_f = F.normalize(model.encode_text(texts), dim=-1)
        base = score(images, text_f)
        for row in range(2):
            for col in range(2):
                occluded = images.clone()
                occluded[:, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 0.0
                assert torch.allclose(exp.patches[:, row, col], base - score(occluded, text_f), atol=1e-5)
        # token 1 (the first word): its embedding zeroed, the text tower written out
        clip = model.clip
        x = clip.token_embedding(texts)
        x[:, 1] = 0.0
        x = clip.transformer(x + clip.positional_embedding, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)[torch.arange(4), texts.argmax(-1)] @ clip.text_projection
        image_f = F.normalize(model.encode_image(images), dim=-1)
        direct = base - (image_f * F.normalize(x, dim=-1)).sum(-1)
    assert torch.allclose(exp.tokens[:, 1], direct, atol=1e-5)


def test_gradient_x_input_sums_the_gradient_times_the_patch_embedding(tiny, tiny_batch):
    model, _ = tiny
    images, texts = tiny_batch
    exp = explain_pairs(model, images, texts, "gradxinput")
    visual = model.clip.visual
    emb = visual.conv1(images).detach().requires_grad_()
    with torch.no_grad():
        text_f = F.normalize(model.encode_text(texts), dim=-1)
    x = emb.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(4, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_post(visual.transformer(visual.ln_pre(x)))[:, 0] @ visual.proj
    score = (F.normalize(x, dim=-1) * text_f).sum(-1)
    (grad,) = torch.autograd.grad(score.sum(), emb)
    assert torch.allclose(exp.patches, (grad * emb).sum(1), atol=1e-6)


def test_frozen_towers_are_explained_too(tiny, tiny_batch):
    model, _ = tiny
    for p in model.parameters():
        p.requires_grad_(False)
    exp = explain_pairs(model, *tiny_batch, "attention")
    assert exp.patches.abs().sum() > 0 and exp.tokens.abs().sum() > 0


def test_unsupported_towers_and_methods_are_refused_by_name(tiny, tiny_batch):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown explanation method 'lime'"):
        explain_pairs(model, *tiny_batch, "lime")
    model.clip.visual.transformer.resblocks[0] = nn.Identity()
    with pytest.raises(UnsupportedTowerError, match="image tower: explanations need open_clip ResidualAttentionBlocks, found Identity"):
        explain_pairs(model, *tiny_batch)

    class NotOpenCLIP(nn.Module):
        pass

    with pytest.raises(UnsupportedTowerError, match="support open_clip models .* got NotOpenCLIP"):
        explain_pairs(NotOpenCLIP(), *tiny_batch)


def test_the_learned_similarity_head_is_the_score_explained(tiny_arch, tiny_batch):
    from mmkit.models.spec import OpenCLIP

    torch.manual_seed(0)
    model = OpenCLIP(arch=tiny_arch, similarity="mlp").build().eval()
    images, texts = tiny_batch
    exp = explain_pairs(model, images, texts, "attention")
    with torch.no_grad():
        out = model(images, texts)
        expected = out["pair_logits"](out["image_features"], out["text_features"]).diagonal()
    assert torch.allclose(exp.scores, expected, atol=1e-5)
    assert exp.patches.abs().sum() > 0
