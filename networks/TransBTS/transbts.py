"""TransBTS (Wang et al., MICCAI 2021), the 8x-downsampling variant with skip connections.

A 3D CNN encoder (16-32-64-128 channels, three stride-2 stages) feeds a convolutional patch
representation of its 1/8-resolution map to a Transformer (learned position encoding); the Transformer's
output is reshaped back to a volume and decoded with the encoder's skip connections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["TransBTS"]


class EncoderBlock(nn.Module):
    """Pre-activation residual block: (BN, ReLU, 3^3 conv) twice, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm3d(channels), nn.Conv3d(channels, channels, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm3d(channels), nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(y)))


class ConvBlock(nn.Module):
    """(3^3 conv, BN, ReLU) twice; with ``residual``, plus the input (then in == out channels)."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.BatchNorm3d(out_channels)
        self.conv2, self.bn2 = nn.Conv3d(out_channels, out_channels, 3, padding=1), nn.BatchNorm3d(out_channels)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return x + y if self.residual else y


class UpConcat(nn.Module):
    """1^3 conv to ``out_channels``, 2x transposed convolution, concatenation with the skip, 1^3 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(in_channels, out_channels, 1)
        self.up = nn.ConvTranspose3d(out_channels, out_channels, 2, stride=2)
        self.fuse = nn.Conv3d(2 * out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat((skip, self.up(self.reduce(x))), dim=1))


class TransformerLayer(nn.Module):
    """Pre-norm multi-head self-attention and MLP (GELU), each with dropout and a residual connection."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # No bias on the query/key/value projection, as in the paper's implementation.
        self.attention = nn.MultiheadAttention(dim, heads, dropout=attention_dropout, bias=False, batch_first=True)
        self.attention.out_proj = nn.Linear(dim, dim)  # the output projection keeps its bias
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.dropout(self.attention(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.norm2(x))


class TransBTS(nn.Module):
    """TransBTS for volumes of ``img_size``^3 voxels (8x downsampling, skip connections).

    Args:
        in_channels: input channels (image modalities).
        out_channels: output channels (segmentation classes; the published constructor ignored this
            and always built 4 outputs, which this class does not repeat).
        img_size: input edge length (a multiple of 8); the learned position encoding has one entry per
            patch of the 1/8-resolution map.
        embedding_dim: Transformer width.
        num_heads: attention heads.
        num_layers: Transformer layers.
        hidden_dim: MLP width of the Transformer.
        dropout_rate: dropout in the Transformer and after the position encoding.
        attn_dropout_rate: dropout of the attention weights.
        base_channels: channels of the first encoder stage (doubling at each stage).

    Details the paper leaves open follow its reference implementation: pre-activation residual encoder
    blocks with batch norm, 3D dropout (0.2) after the first convolution, no bias on the query/key/value
    projection, the decoder reading the last Transformer layer's output. Two parameters of that
    implementation are left out because its forward never uses them (an unused linear patch embedding,
    128 x 512, and a LayerNorm): 31.51 M parameters at 5 classes against the paper's 31.6 M. It returns
    logits, as the reference implementation does (its softmax line is commented out); the DiceCE loss
    and inference apply the softmax.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 5,
        img_size: int | Sequence[int] = 96,
        embedding_dim: int = 512,
        num_heads: int = 8,
        num_layers: int = 4,
        hidden_dim: int = 4096,
        dropout_rate: float = 0.1,
        attn_dropout_rate: float = 0.1,
        base_channels: int = 16,
    ) -> None:
        super().__init__()
        try:
            size = ensure_tuple_rep(img_size, 3)
        except ValueError:
            raise ValueError(f"img_size must be one or three multiples of 8, got {img_size!r}") from None
        if any(s % 8 for s in size):
            raise ValueError(f"img_size must be one or three multiples of 8, got {img_size!r}")
        if embedding_dim % num_heads or embedding_dim % 4:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a multiple of num_heads and of 4")
        c = base_channels
        self.img_size, self.embedding_dim = size, embedding_dim
        self.grid = tuple(s // 8 for s in size)
        self.init_conv = nn.Conv3d(in_channels, c, 3, padding=1)
        self.init_dropout = nn.Dropout3d(0.2)
        self.stage1 = EncoderBlock(c)
        self.down1 = nn.Conv3d(c, 2 * c, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(EncoderBlock(2 * c), EncoderBlock(2 * c))
        self.down2 = nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1)
        self.stage3 = nn.Sequential(EncoderBlock(4 * c), EncoderBlock(4 * c))
        self.down3 = nn.Conv3d(4 * c, 8 * c, 3, stride=2, padding=1)
        self.stage4 = nn.Sequential(*[EncoderBlock(8 * c) for _ in range(4)])
        self.patch_norm = nn.BatchNorm3d(8 * c)
        self.patch_embedding = nn.Conv3d(8 * c, embedding_dim, 3, padding=1)
        self.position_embedding = nn.Parameter(
            torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], embedding_dim)
        )
        self.position_dropout = nn.Dropout(dropout_rate)
        self.transformer = nn.Sequential(
            *[
                TransformerLayer(embedding_dim, num_heads, hidden_dim, dropout_rate, attn_dropout_rate)
                for _ in range(num_layers)
            ]
        )
        self.bottleneck = nn.Sequential(
            ConvBlock(embedding_dim, embedding_dim // 4, residual=False),
            ConvBlock(embedding_dim // 4, embedding_dim // 4, residual=True),
        )
        self.up3, self.decoder3 = UpConcat(embedding_dim // 4, 4 * c), ConvBlock(4 * c, 4 * c, residual=True)
        self.up2, self.decoder2 = UpConcat(4 * c, 2 * c), ConvBlock(2 * c, 2 * c, residual=True)
        self.up1, self.decoder1 = UpConcat(2 * c, c), ConvBlock(c, c, residual=True)
        self.out = nn.Conv3d(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"TransBTS was built for inputs of {self.img_size}, got {tuple(x.shape[2:])}")
        skip1 = self.stage1(self.init_dropout(self.init_conv(x)))
        skip2 = self.stage2(self.down1(skip1))
        skip3 = self.stage3(self.down2(skip2))
        deep = self.stage4(self.down3(skip3))
        tokens = self.patch_embedding(F.relu(self.patch_norm(deep))).flatten(2).transpose(1, 2)
        tokens = self.transformer(self.position_dropout(tokens + self.position_embedding))
        volume = tokens.transpose(1, 2).reshape(x.shape[0], self.embedding_dim, *self.grid)
        y = self.bottleneck(volume)
        y = self.decoder3(self.up3(y, skip3))
        y = self.decoder2(self.up2(y, skip2))
        y = self.decoder1(self.up1(y, skip1))
        return self.out(y)
