"""GradCAM attention: shapes, range, no parameter gradients, fallback, a one-channel score."""

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn

from gtms.pseudo import gradcam_attention


class TinyAttentionPool(nn.Module):
    """A CLIP-like attention pool: the mean token attends over all positions."""

    def __init__(self, channels=8, embed_dim=6, heads=2, positions=16):
        super().__init__()
        self.position = nn.Parameter(torch.randn(positions + 1, channels) * 0.1)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.project = nn.Linear(channels, embed_dim)

    def forward(self, features):  # [B, C, h, w] -> [B, D]
        tokens = features.flatten(2).transpose(1, 2)  # [B, hw, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.position
        pooled, _ = self.attention(tokens[:, :1], tokens, tokens, need_weights=False)
        return self.project(pooled[:, 0])


class OneChannelScore(nn.Module):
    """g = (mean of channel k, 1): with t = (1, 0), cos(g, t) grows with channel k only."""

    def __init__(self, channels, k):
        super().__init__()
        self.select = nn.Linear(channels, 2)
        with torch.no_grad():
            self.select.weight.zero_()
            self.select.weight[0, k] = 1.0
            self.select.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, features):
        return self.select(features.mean(dim=(2, 3)))


def boxes(batch, size):
    box = torch.zeros(batch, size, size)
    box[:, 2:12, 3:14] = 1.0
    return box


def test_shapes_range_and_no_parameter_gradients():
    torch.manual_seed(0)
    pool = TinyAttentionPool()
    layer4 = torch.randn(3, 8, 4, 4, requires_grad=True)
    sentence = torch.randn(3, 6, requires_grad=True)
    box = boxes(3, 16)
    attention = gradcam_attention(layer4, sentence, pool, box)
    assert attention.shape == (3, 16, 16) and attention.dtype == torch.float32
    assert not attention.requires_grad
    assert attention.min() >= 0 and attention.max() <= 1
    in_box_max = (attention * box).amax(dim=(1, 2))
    torch.testing.assert_close(in_box_max, torch.ones(3))
    assert all(p.grad is None for p in pool.parameters())
    assert layer4.grad is None and sentence.grad is None


def test_works_under_no_grad():
    torch.manual_seed(1)
    pool = TinyAttentionPool()
    with torch.no_grad():
        attention = gradcam_attention(torch.randn(2, 8, 4, 4), torch.randn(2, 6), pool,
                                      boxes(2, 16))
    assert attention.shape == (2, 16, 16) and attention.max() > 0
    assert all(p.grad is None for p in pool.parameters())


def test_one_channel_score_gives_that_channels_relu():
    torch.manual_seed(2)
    k = 3
    layer4 = torch.randn(2, 5, 4, 4)
    box = boxes(2, 16)
    attention = gradcam_attention(layer4, torch.tensor([[1.0, 0.0]] * 2),
                                  OneChannelScore(5, k), box)
    expected = nnf.interpolate(torch.relu(layer4[:, k : k + 1]), size=(16, 16),
                               mode="bilinear", align_corners=False)[:, 0]
    expected = (expected / (expected * box).amax(dim=(1, 2), keepdim=True)).clamp(0, 1)
    torch.testing.assert_close(attention, expected)


def test_all_zero_map_falls_back_to_the_box():
    # Channel k is negative everywhere: ReLU leaves nothing, so A = box for that sample.
    layer4 = torch.randn(2, 5, 4, 4)
    layer4[0, 1] = -1.0 - layer4[0, 1].abs()
    layer4[1, 1] = 1.0 + layer4[1, 1].abs()
    box = boxes(2, 16)
    attention = gradcam_attention(layer4, torch.tensor([[1.0, 0.0]] * 2),
                                  OneChannelScore(5, 1), box)
    torch.testing.assert_close(attention[0], box[0])
    assert not torch.equal(attention[1], box[1])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        gradcam_attention(torch.randn(2, 8, 4), torch.randn(2, 6), TinyAttentionPool(),
                          boxes(2, 16))
