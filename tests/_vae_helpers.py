"""A tiny Wan VAE for the VAE tests, and the pieces of an independent causal reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rf_core.vae.wan_vae import WanVAE, WanVAEConfig

# Wan's latent statistics, written out again (reference-algorithm.md §4.4).
MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
       3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


def tiny_vae(dtype: torch.dtype = torch.float32, seed: int | None = None) -> WanVAE:
    """dim=8 VAE whose norm gains and biases are random too (all-ones gains hide shape mistakes)."""
    if seed is not None:
        torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig(dim=8))
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae.to(dtype).eval().requires_grad_(False)


def rms(norm, x):
    c = x.shape[1]
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt() * math.sqrt(c) * norm.gamma


def silu(x):
    return x * torch.sigmoid(x)


class CausalReference:
    """Wan's per-call causal schedule, written independently of rf_core.vae: the network is called
    on a few frames at a time with one history slot per temporal conv (visited in call order);
    a conv prepends its slot (zero padding in front where the slot is short or empty) and keeps
    the last two frames of its input. Subclasses walk the encoder or the decoder."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.slots: list = []

    def conv(self, conv, x):
        kt = conv.weight.shape[2]
        pad_hw = conv.weight.shape[3] // 2
        if kt == 1:
            return F.conv3d(x, conv.weight, conv.bias, padding=(0, pad_hw, pad_hw))
        i = self.next_slot()
        past = self.slots[i]
        frames = [x] if past is None else [past, x]
        inp = torch.cat(frames, dim=2)
        self.slots[i] = inp[:, :, -2:].clone()
        zeros = (kt - 1) - (inp.shape[2] - x.shape[2])
        inp = F.pad(inp, (0, 0, 0, 0, zeros, 0))
        return F.conv3d(inp, conv.weight, conv.bias, padding=(0, pad_hw, pad_hw))

    def next_slot(self):
        self.idx += 1
        if self.idx >= len(self.slots):
            self.slots.append(None)
        return self.idx

    def residual(self, block, x):
        n1, _, c1, n2, _, _, c2 = block.residual
        h = self.conv(c1, silu(rms(n1, x)))
        h = self.conv(c2, silu(rms(n2, h)))
        short = x if isinstance(block.shortcut, torch.nn.Identity) else self.conv(block.shortcut, x)
        return h + short

    def attention(self, block, x):
        b, c, t, h, w = x.shape
        out = torch.empty_like(x)
        for f in range(t):
            frame = x[:, :, f]
            y = rms(block.norm, frame).flatten(2)  # [b, c, hw]
            qkv = torch.einsum("oc,bcn->bon", block.to_qkv.weight[:, :, 0, 0], y) + block.to_qkv.bias[:, None]
            q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
            att = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / math.sqrt(c), dim=-1)
            o = torch.einsum("bnm,bcm->bcn", att, v)
            o = torch.einsum("oc,bcn->bon", block.proj.weight[:, :, 0, 0], o) + block.proj.bias[:, None]
            out[:, :, f] = frame + o.reshape(b, c, h, w)
        return out
