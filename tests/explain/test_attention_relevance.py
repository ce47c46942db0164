"""The relevance rule against hand computations, and the attention it reads against torch's own."""

import math

import torch
import torch.nn.functional as F

from mmkit.explain import explain_pairs
from mmkit.explain.attention_relevance import propagate_relevance
from mmkit.explain.towers import towers_for


def test_propagate_relevance_matches_the_rule_written_out():
    torch.manual_seed(0)
    layers, heads, length = 2, 3, 4
    attn = [torch.rand(1, heads, length, length).softmax(-1) for _ in range(layers)]
    grads = [torch.randn(1, heads, length, length) for _ in range(layers)]
    expected = [[1.0 if i == j else 0.0 for j in range(length)] for i in range(length)]
    for a, g in zip(attn, grads):
        bar = [[sum(max(g[0, h, i, j].item() * a[0, h, i, j].item(), 0.0) for h in range(heads)) / heads
                for j in range(length)] for i in range(length)]
        expected = [[expected[i][j] + sum(bar[i][m] * expected[m][j] for m in range(length)) for j in range(length)]
                    for i in range(length)]
    got = propagate_relevance(attn, grads)[0]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)


def test_recorded_attention_is_torchs_and_leaves_the_outputs_unchanged(tiny, tiny_batch):
    model, _ = tiny
    images, texts = tiny_batch
    towers = towers_for(model)
    with torch.no_grad():
        plain = model(images, texts)
        with towers.recording() as maps:
            patched = model(images, texts)
        visual = model.clip.visual
        x = visual._embeds(images)
        block = towers.image.blocks[0]
        _, torch_weights = block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=True,
                                      average_attn_weights=False)
    assert torch.allclose(patched["image_features"], plain["image_features"], atol=1e-5)
    assert torch.allclose(patched["text_features"], plain["text_features"], atol=1e-5)
    assert torch.allclose(maps["image"][0], torch_weights, atol=1e-6)
    assert [m.shape[-1] for m in maps["text"]] == [texts.shape[1]]
    # the causal text mask: no token attends to a later one
    assert maps["text"][0].triu(diagonal=1).abs().max() == 0
    assert "attention" not in vars(towers.image.blocks[0])  # the patch is undone


def test_one_layer_image_relevance_equals_a_hand_computation(tiny, tiny_batch):
    """The ViT forward written out with the attention probabilities as a leaf: relevance of the
    class token for patch j is mean_h clamp(dscore/dA * A, 0)[cls, j] after one layer."""
    model, _ = tiny
    images, texts = tiny_batch
    visual, block = model.clip.visual, model.clip.visual.transformer.resblocks[0]
    mha = block.attn
    with torch.no_grad():
        text_f = F.normalize(model.encode_text(texts), dim=-1)
        x = visual._embeds(images)
        h = block.ln_1(x)
        b, n, d = h.shape
        heads = mha.num_heads
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).split(d, dim=-1)
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
    probs.requires_grad_()
    y = x + mha.out_proj((probs @ v).transpose(1, 2).reshape(b, n, d))
    y = y + block.mlp(block.ln_2(y))
    pooled = visual.ln_post(y)[:, 0] @ visual.proj
    score = (F.normalize(pooled, dim=-1) * text_f).sum(-1)
    (grad,) = torch.autograd.grad(score.sum(), probs)
    expected = (grad * probs).clamp(min=0).mean(1)[:, 0, 1:].reshape(b, 2, 2)

    got = explain_pairs(model, images, texts, "attention")
    assert torch.allclose(got.scores, score.detach(), atol=1e-5)
    assert torch.allclose(got.patches, expected, atol=1e-6)
