"""``torchvision.utils.make_grid``: images side by side in one tensor (Determined's GAN example logs one)."""

import torch


def make_grid(tensor: torch.Tensor, nrow: int = 8, padding: int = 2, **kwargs) -> torch.Tensor:
    """A (C, H, W) grid of a (B, C, H, W) batch, `nrow` images a row, `padding` pixels between them."""
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    b, c, h, w = tensor.shape
    cols = min(nrow, b)
    rows = -(-b // cols)
    grid = tensor.new_zeros((c, rows * (h + padding) + padding, cols * (w + padding) + padding))
    for i in range(b):
        r, k = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = tensor[i]
    return grid
