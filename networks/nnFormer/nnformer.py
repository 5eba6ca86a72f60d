"""nnFormer (Zhou et al., "nnFormer: Interleaved Transformer for Volumetric Segmentation"), 3D.

A convolutional patch embedding feeds four stages of local-volume (shifted-window) self-attention,
joined by stride-2 convolutions; the decoder mirrors the three shallower stages, each starting with a
skip attention block (queries from the up-sampled map, keys and values from the encoder's skip), and a
transposed convolution restores the input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["nnFormer"]

Size3 = tuple[int, int, int]

# Added to the attention logits between tokens of different regions of a shifted window (as in Swin).
MASKED_LOGIT = -100.0


def effective_window(resolution: Size3, window: int, shift: int) -> tuple[int, int]:
    """Window edge and shift of a stage: a window at least as large as the smallest side of the map
    becomes that side and stops shifting (the reference implementation's rule)."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, shift


def padded_size(resolution: Size3, window: int) -> Size3:
    """``resolution`` padded up to multiples of ``window`` on each side."""
    return tuple(side + (-side) % window for side in resolution)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, S, H, W, C)`` with sides divisible by ``window`` -> ``(B * windows, window^3, C)``."""
    b, s, h, w, c = x.shape
    x = x.view(b, s // window, window, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window**3, c)


def window_reverse(windows: torch.Tensor, window: int, size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition` for a map of ``size = (B, S, H, W)``."""
    b, s, h, w = size
    x = windows.view(b, s // window, h // window, w // window, window, window, window, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, s, h, w, -1)


def shifted_window_mask(padded: Size3, window: int, shift: int) -> torch.Tensor:
    """``(windows, window^3, window^3)`` logits offsets that keep attention inside each region that a
    cyclic shift by ``shift`` brought together in one window."""
    regions = torch.zeros(1, *padded, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for s in bounds:
        for h in bounds:
            for w in bounds:
                regions[:, s, h, w, :] = label
                label += 1
    labels = window_partition(regions, window).squeeze(-1)
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, MASKED_LOGIT)


def relative_position_index(window: int) -> torch.Tensor:
    """``(window^3, window^3)`` index into a table of ``(2 window - 1)^3`` relative offsets."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)
    offsets = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0) + (window - 1)
    side = 2 * window - 1
    return (offsets[..., 0] * side + offsets[..., 1]) * side + offsets[..., 2]


class WindowAttention(nn.Module):
    """Multi-head attention inside cubic windows, with a learned relative position bias.

    Args:
        dim: token channels.
        window: window edge.
        num_heads: attention heads.
        cross: keys and values come from a second input (the skip) through one projection, and the
            queries are the first input as it is (nnFormer's skip attention); otherwise self-attention.
    """

    def __init__(self, dim: int, window: int, num_heads: int, cross: bool = False) -> None:
        super().__init__()
        self.num_heads, self.cross = num_heads, cross
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from the window: not part of the state dict.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        if cross:
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x``: ``(B * windows, N, C)`` tokens; ``mask``: ``(windows, N, N)`` or None; ``context``: the
        key/value tokens of cross attention."""
        windows, n, c = x.shape
        heads = self.num_heads
        if self.cross:
            q = x.reshape(windows, n, heads, c // heads).transpose(1, 2)
            k, v = self.kv(context).reshape(windows, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).reshape(windows, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        bias = bias.view(n, n, heads).permute(2, 0, 1)
        if mask is not None:
            per_window = (bias.unsqueeze(0) + mask.unsqueeze(1)).to(q.dtype)  # (windows, heads, N, N)
            bias = per_window.unsqueeze(0).expand(windows // mask.shape[0], -1, -1, -1, -1).flatten(0, 1)
        else:
            bias = bias.to(q.dtype).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(windows, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual connection and drop path.

    Args:
        dim: token channels.
        resolution: ``(S, H, W)`` of the token map.
        num_heads: attention heads.
        window: window edge, ``shift``: cyclic shift (both already through :func:`effective_window`).
        mlp_ratio: MLP width over ``dim``.
        drop_path: stochastic-depth rate.
        cross: a skip attention block (see :class:`WindowAttention`); its input is the sum of the
            up-sampled map and the skip, which the residual connection keeps.
    """

    def __init__(
        self,
        dim: int,
        resolution: Size3,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.padded = padded_size(resolution, window)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, cross=cross)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windows(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, c = tokens.shape
        s, h, w = self.resolution
        x = tokens.view(b, s, h, w, c)
        ps, ph, pw = (p - side for p, side in zip(self.padded, self.resolution, strict=True))
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, ps))
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift,) * 3, dims=(1, 2, 3))
        return window_partition(x, self.window)

    def _merge(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        s, h, w = self.resolution
        x = window_reverse(windows, self.window, (batch, *self.padded))
        if self.shift:
            x = torch.roll(x, shifts=(self.shift,) * 3, dims=(1, 2, 3))
        return x[:, :s, :h, :w].reshape(batch, s * h * w, -1)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        skip: torch.Tensor | None = None,
        up: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: ``(B, S*H*W, C)``; a skip attention block also takes the ``skip`` and ``up`` tokens
        whose sum ``x`` is."""
        mask = mask if self.shift else None
        if skip is None:
            attended = self.attn(self._windows(self.norm1(x)), mask)
        else:
            query, context = self._windows(self.norm1(up)), self._windows(self.norm1(skip))
            attended = self.attn(query, mask, context=context)
        x = x + self.drop_path(self._merge(attended, x.shape[0]))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Transformer blocks at one resolution, alternating plain and shifted windows.

    ``cross`` makes the first block a skip attention block (a decoder stage). The reference decoder
    shifts every block after the first; with the published depth of 2 the two rules agree.
    """

    def __init__(
        self,
        dim: int,
        resolution: Size3,
        depth: int,
        num_heads: int,
        window: int,
        drop_path: Sequence[float],
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window, self.shift = effective_window(resolution, window, window // 2)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                resolution,
                num_heads,
                self.window,
                self.shift if i % 2 else 0,
                drop_path=drop_path[i],
                cross=cross and i == 0,
            )
            for i in range(depth)
        )
        # Fixed by the resolution: built once, not part of the state dict.
        mask = (
            shifted_window_mask(padded_size(resolution, self.window), self.window, self.shift) if self.shift else None
        )
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, up: torch.Tensor | None = None):
        """``skip`` and ``up`` (a decoder stage) go to the skip attention block."""
        x = self.blocks[0](x, self.mask, skip, up)
        for block in self.blocks[1:]:
            x = block(x, self.mask)
        return x


class Projection(nn.Module):
    """Conv (3^3, ``stride``), GELU, LayerNorm, conv (3^3); then GELU and LayerNorm unless ``last``."""

    def __init__(self, in_channels: int, out_channels: int, stride: Size3, last: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm1 = nn.LayerNorm(out_channels)
        self.norm2 = None if last else nn.LayerNorm(out_channels)

    @staticmethod
    def _channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        # One fused layer_norm on a channels-last view rather than networks.layers.LayerNorm's
        # hand-written channels-first steps: fewer saved activations on the network's largest maps.
        return norm(x.movedim(1, -1)).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self._channel_norm(self.norm1, F.gelu(self.conv1(x))))
        return x if self.norm2 is None else self._channel_norm(self.norm2, F.gelu(x))


class PatchEmbedding(nn.Module):
    """Two convolutional projections down to one token per ``patch_size`` voxels, then a LayerNorm."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: Size3) -> None:
        super().__init__()
        first = (patch_size[0], patch_size[1] // 2, patch_size[2] // 2)
        second = (patch_size[0] // 2, patch_size[1] // 2, patch_size[2] // 2)
        self.proj1 = Projection(in_channels, embed_dim // 2, first, last=False)
        self.proj2 = Projection(embed_dim // 2, embed_dim, second, last=True)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, tokens, embed_dim)``."""
        return self.norm(self.proj2(self.proj1(x)).flatten(2).transpose(1, 2))


class PatchMerging(nn.Module):
    """GELU, LayerNorm and a stride-2 3^3 convolution doubling the channels."""

    def __init__(self, dim: int, resolution: Size3) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Conv3d(dim, 2 * dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(x)).transpose(1, 2).reshape(x.shape[0], -1, *self.resolution)
        return self.reduction(x).flatten(2).transpose(1, 2)


class PatchExpanding(nn.Module):
    """LayerNorm and a stride-2 transposed convolution halving the channels."""

    def __init__(self, dim: int, resolution: Size3) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(dim)
        self.up = nn.ConvTranspose3d(dim, dim // 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, *self.resolution)
        return self.up(x).flatten(2).transpose(1, 2)


def _linear_rates(largest: float, count: int) -> list[float]:
    """``count`` drop-path rates from 0 to ``largest`` (computed in Python: works on the meta device)."""
    return [largest * i / max(count - 1, 1) for i in range(count)]


class nnFormer(nn.Module):  # noqa: N801 (the paper's spelling)
    """nnFormer for volumes of ``crop_size`` voxels, in the published benchmark's 96^3 configuration.

    Args:
        in_channels: input channels (image modalities).
        out_channels: output channels (segmentation classes, from the dataset).
        crop_size: input size ``(D, H, W)`` (or one edge); each side a multiple of its patch size times 8.
            Window sizes and attention masks are fixed for it.
        embed_dim: channels of the first stage (doubling at each of the four stages).
        depths: Transformer blocks per encoder stage (the decoder uses the three shallower ones).
        num_heads: attention heads per encoder stage.
        patch_size: voxels per token along each axis.
        window_size: window edge per encoder stage; a window at least as large as the smallest side of
            its stage's map becomes that side, unshifted.
        mlp_ratio: MLP width over the token channels.
        drop_path_rate: largest stochastic-depth rate (rising linearly over the blocks of the encoder,
            and of the decoder).

    The decoder reads the encoder's lists reversed, without the deepest entry. Details the paper leaves
    open follow its reference implementation (the Synapse configuration that the benchmark adopts):
    convolutional patch embedding (two conv-GELU-LayerNorm projections), stride-2 3^3 convolutions
    between stages, transposed convolutions up, skip attention whose queries are the up-sampled tokens
    without a projection, one LayerNorm per encoder output, PyTorch's default initialisation but a
    truncated normal (std 0.02) for the position bias tables, no deep supervision. That gives 149.27 M
    parameters at 5 classes (the paper's table: 149.3 M). Unlike the reference implementation, each
    relative offset in a window has its own position bias (its index formula made distinct offsets
    share entries).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        crop_size: int | Sequence[int] = 96,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        patch_size: int | Sequence[int] = (2, 4, 4),
        window_size: Sequence[int] = (4, 4, 8, 4),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        try:
            crop, patch = ensure_tuple_rep(crop_size, 3), ensure_tuple_rep(patch_size, 3)
        except ValueError:
            given = f"{crop_size!r}, {patch_size!r}"
            raise ValueError(f"crop_size and patch_size must be one or three integers, got {given}") from None
        stages = len(depths)
        if stages < 2 or len(num_heads) != stages or len(window_size) != stages:
            raise ValueError(
                f"depths, num_heads and window_size need one entry per stage (at least 2), got "
                f"{len(depths)}, {len(num_heads)} and {len(window_size)}"
            )
        if any(p % 2 for p in patch):
            raise ValueError(f"patch_size must be even along each axis, got {patch}")
        multiples = tuple(p * 2 ** (stages - 1) for p in patch)
        if any(c % m for c, m in zip(crop, multiples, strict=True)):
            raise ValueError(f"crop_size {crop} must be a multiple of {multiples} (patch size x {2 ** (stages - 1)})")
        dims = [embed_dim * 2**i for i in range(stages)]
        if embed_dim % 2 or any(d % h for d, h in zip(dims, num_heads, strict=True)):
            raise ValueError(f"stage widths {dims} must be even multiples of num_heads {tuple(num_heads)}")
        self.crop_size = crop
        grids = [tuple(c // p // 2**i for c, p in zip(crop, patch, strict=True)) for i in range(stages)]

        self.patch_embedding = PatchEmbedding(in_channels, embed_dim, patch)
        rates = _linear_rates(drop_path_rate, sum(depths))
        self.encoder = nn.ModuleList(
            Stage(dims[i], grids[i], depths[i], num_heads[i], window_size[i], rates[sum(depths[:i]) :][: depths[i]])
            for i in range(stages)
        )
        self.merging = nn.ModuleList(PatchMerging(dims[i], grids[i]) for i in range(stages - 1))
        self.encoder_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        # Decoder stage i (width dims[i]) follows encoder stage i+1; its drop-path rates rise from the
        # deepest decoder stage to the shallowest (the deeper ones, i+1 .. stages-2, come first), as the
        # reference implementation has them.
        rates = _linear_rates(drop_path_rate, sum(depths[:-1]))
        self.expanding = nn.ModuleList(PatchExpanding(dims[i + 1], grids[i + 1]) for i in range(stages - 1))
        self.decoder = nn.ModuleList(
            Stage(
                dims[i],
                grids[i],
                depths[i],
                num_heads[i],
                window_size[i],
                rates[sum(depths[i + 1 : -1]) :][: depths[i]],
                cross=True,
            )
            for i in range(stages - 1)
        )
        self.out = nn.ConvTranspose3d(embed_dim, out_channels, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.crop_size:
            raise ValueError(f"nnFormer was built for inputs of {self.crop_size}, got {tuple(x.shape[2:])}")
        tokens = self.patch_embedding(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            tokens = stage(tokens)
            skips.append(self.encoder_norms[i](tokens))
            if i < len(self.merging):
                tokens = self.merging[i](tokens)
        tokens = skips[-1]
        for i in reversed(range(len(self.decoder))):
            up = self.expanding[i](tokens)
            tokens = self.decoder[i](up + skips[i], skip=skips[i], up=up)
        volume = tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.decoder[0].resolution)
        return self.out(volume)
