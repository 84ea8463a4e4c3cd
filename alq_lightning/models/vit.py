"""A tiny vision transformer (ViT, Dosovitskiy et al. 2021) built from PyTorch's own modules."""
from __future__ import annotations

import torch
from torch import nn

from alq_lightning.models.lenet import check_positive_int


class ViTTiny(nn.Module):
    """Patch embedding → [class token; patches] + position embedding → pre-norm encoder → LayerNorm → Linear head.

    With ``p = patch_size``, ``T = (input_size // p)²`` patches and ``D = dim``:

    - ``patch_embedding``: ``nn.Conv2d(in_channels, D, p, stride=p)``, ``[B, C, H, W] -> [B, D, H/p, W/p]``,
      flattened to ``[B, T, D]`` tokens;
    - ``class_token`` ``[1, D]`` and ``position_embedding`` ``[T + 1, D]``: raw ``nn.Parameter`` matrices
      (not modules); the class token is prepended to the tokens (``[B, T + 1, D]``) and the position embedding
      added;
    - ``encoder``: ``depth`` ``nn.TransformerEncoderLayer(D, heads, mlp_ratio·D, batch_first=True,
      norm_first=True)`` with GELU; each layer's ``self_attn`` (``nn.MultiheadAttention``) holds Q, K and V
      in one raw Parameter ``in_proj_weight`` ``[3D, D]`` next to ``out_proj`` (a Linear), then
      ``linear1`` ``[mlp_ratio·D, D]`` and ``linear2`` ``[D, mlp_ratio·D]``;
    - ``norm`` (LayerNorm over ``D``) of the class token's output, then ``head``: ``nn.Linear(D, num_classes)``.

    Args:
        in_channels: image channels.
        num_classes: number of output logits.
        input_size: height = width of the square input; a multiple of ``patch_size``.
        patch_size: side of the square, non-overlapping patches.
        dim: token width ``D``; a multiple of ``heads``.
        depth: number of encoder layers.
        heads: attention heads per layer.
        mlp_ratio: hidden width of each layer's MLP, in multiples of ``dim``.
        dropout: dropout probability in the encoder layers, in ``[0, 1)``.

    Shapes: ``[B, in_channels, input_size, input_size]`` -> ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int(in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                           patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}; allowed: "
                             f"patch sizes dividing input_size")
        if dim % heads:
            raise ValueError(f"dim={dim} is not a multiple of heads={heads}; allowed: heads dividing dim")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")
        tokens = (input_size // patch_size) ** 2 + 1
        self.patch_embedding = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.empty(1, dim))
        self.position_embedding = nn.Parameter(torch.empty(tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=mlp_ratio * dim, dropout=float(dropout),
                                           activation="gelu", batch_first=True, norm_first=True)
        # Nested tensors only serve padding masks, and norm_first layers cannot use them (PyTorch warns).
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, T, D]
        first = self.class_token.expand(tokens.shape[0], 1, -1)  # [B, 1, D]
        tokens = torch.cat([first, tokens], dim=1) + self.position_embedding  # [B, T + 1, D]
        return self.head(self.norm(self.encoder(tokens)[:, 0]))
