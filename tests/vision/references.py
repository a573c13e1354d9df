"""Independent references for the vision tests.

``OfficialBiFormer`` re-creates the module tree and forward pass of the official BiFormer
code (``models/biformer.py``, ``models/_common.py``, ``ops/bra_legacy.py`` of
rayleizhu/BiFormer): ``downsample_layers`` / ``stages.i.j`` names, the ``torch.gather`` copy
of the routed key/value regions with one softmax, LePE on the values (routing blocks) or on
the block input (full-attention block, 8 heads), ``mlp.0`` / ``mlp.3``. Its state dict has the
official key names and shapes; it only runs on sizes divisible by ``n_win`` at every stage,
like the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _QKVLinear(nn.Module):
    def __init__(self, dim, qk_dim):
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim)

    def forward(self, x):
        return self.qkv(x).split([self.qk_dim, self.qkv.out_features - self.qk_dim], dim=-1)


class _GatherBRA(nn.Module):
    def __init__(self, dim, num_heads, n_win, topk, side_dwconv):
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = dim**-0.5
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv = _QKVLinear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x):
        n, H, W, C = x.shape
        nw, m = self.n_win, self.num_heads
        assert H % nw == 0 and W % nw == 0
        h, w, p2 = H // nw, W // nw, nw * nw
        x = x.reshape(n, nw, h, nw, w, C).permute(0, 1, 3, 2, 4, 5).reshape(n, p2, h, w, C)
        q, kv = self.qkv(x)
        q_pix = q.reshape(n, p2, h * w, C)
        kv_pix = kv.reshape(n, p2, h * w, 2 * C)
        q_win, k_win = q.mean([2, 3]), kv[..., :C].mean([2, 3])
        v_img = kv[..., C:].reshape(n, nw, nw, h, w, C).permute(0, 5, 1, 3, 2, 4)
        lepe = self.lepe(v_img.reshape(n, C, H, W)).permute(0, 2, 3, 1)
        logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        _, r_idx = torch.topk(logits, k=self.topk, dim=-1)
        w2, ckv, k = h * w, 2 * C, self.topk
        sel = torch.gather(
            kv_pix.view(n, 1, p2, w2, ckv).expand(-1, p2, -1, -1, -1),
            dim=2,
            index=r_idx.view(n, p2, k, 1, 1).expand(-1, -1, -1, w2, ckv),
        )
        k_sel, v_sel = sel.split([C, C], dim=-1)
        k_sel = k_sel.reshape(n * p2, k * w2, m, -1).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(n * p2, k * w2, m, -1).transpose(1, 2)
        q_pix = q_pix.reshape(n * p2, w2, m, -1).transpose(1, 2)
        attn = ((q_pix * self.scale) @ k_sel).softmax(-1)
        out = (attn @ v_sel).reshape(n, nw, nw, m, h, w, -1).permute(0, 1, 4, 2, 5, 3, 6)
        return self.wo(out.reshape(n, H, W, C) + lepe)


class _AttentionLePE(nn.Module):
    def __init__(self, dim, num_heads=8, side_dwconv=5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x):
        _, H, W, _ = x.shape
        x = x.reshape(x.shape[0], H * W, -1)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        lepe = self.lepe(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C) + lepe
        return self.proj(x).reshape(B, H, W, C)


class _Block(nn.Module):
    def __init__(self, dim, num_heads, n_win, topk, mlp_ratio, side_dwconv):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = _GatherBRA(dim, num_heads, n_win, topk, side_dwconv)
        else:
            self.attn = _AttentionLePE(dim, side_dwconv=side_dwconv)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim)
        )

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class OfficialBiFormer(nn.Module):
    def __init__(
        self,
        depth=(2, 2, 8, 2),
        embed_dim=(64, 128, 256, 512),
        head_dim=32,
        mlp_ratios=(3, 3, 3, 3),
        n_win=7,
        topks=(1, 4, 16, -2),
        side_dwconv=5,
        num_classes=1000,
    ):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(3, embed_dim[0] // 2, 3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dim[0] // 2),
                nn.GELU(),
                nn.Conv2d(embed_dim[0] // 2, embed_dim[0], 3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dim[0]),
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, stride=2, padding=1),
                    nn.BatchNorm2d(embed_dim[i + 1]),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *[
                    _Block(
                        embed_dim[i],
                        embed_dim[i] // head_dim,
                        n_win,
                        topks[i],
                        mlp_ratios[i],
                        side_dwconv,
                    )
                    for _ in range(depth[i])
                ]
            )
            for i in range(4)
        )
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes)

    def forward(self, x):
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.head(self.norm(x).flatten(2).mean(-1))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic a random value (in place), so that tests
    do not pass on default initialisations (zero biases, unit norms, identity statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan = t[0].numel() if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) / max(fan, 1) ** 0.5)
    return model


def pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``[B, C, H, W]`` on the bottom/right to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))
