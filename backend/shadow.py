"""The screen-space shadow (and bounce-light) estimator: a UNet applied to the shader's output.

shaded = unshadowed * shadow + indirect. Inputs are the unshadowed image divided by its foreground
mean luminance (then log1p), albedo, normal, AO, log depth relative to the median, and the mask, so
the shadow does not depend on exposure and the whole pipeline stays linear in the HDRI's strength.
With `visibility`, a 13th input is the screen-space share of direct light that reaches each pixel
(backend/visibility.py): where the light comes from and what blocks it, which the images alone lack.
The paper-faithful variant (base 64, depth 4, no indirect term) follows the paper's UNet on
(unshadowed, normal, AO); the default is a far smaller net that also predicts bounce light.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_CHANNELS = 12  # unshadowed 3, albedo 3, normal 3, ao, depth, mask (+ visibility)


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.GroupNorm(min(8, outputs), outputs),
                         nn.SiLU(), nn.Conv2d(outputs, outputs, 3, padding=1), nn.SiLU())


class ShadowNet(nn.Module):
    def __init__(self, base: int = 16, depth: int = 3, indirect: bool = True, visibility: bool = False):
        super().__init__()
        self.base, self.depth, self.indirect, self.visibility = base, depth, indirect, visibility
        widths = [base * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        channels = INPUT_CHANNELS + visibility
        for width in widths:
            self.down.append(_block(channels, width))
            channels = width
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(base, 4 if indirect else 1, 1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start near "no shadow, no bounce light"
            self.head.bias.copy_(torch.tensor([4.0, -8.0, -8.0, -8.0][: self.head.out_channels]))

    def config(self) -> dict:
        return {"arch": "unet", "base": self.base, "depth": self.depth, "indirect": self.indirect,
                "visibility": self.visibility}

    @property
    def multiple(self) -> int:
        """Image sizes are padded to a multiple of this."""
        return 2 ** (self.depth - 1)

    def forward(self, unshadowed, albedo, normal, ao, depth, mask, visibility=None):
        """Images as (B, C, H, W); returns (shadow (B, 1, H, W) in [0, 1], indirect (B, 3, H, W) >= 0).
        `visibility` (B, 1, H, W) is required by, and only given to, a net built with visibility=True."""
        if (visibility is not None) != self.visibility:
            raise ValueError(f"this shadow net {'needs a' if self.visibility else 'takes no'} visibility input")
        weights = torch.tensor([0.2126, 0.7152, 0.0722], device=unshadowed.device).view(1, 3, 1, 1)
        lum = (unshadowed * weights).sum(1, keepdim=True)
        coverage = mask.sum((2, 3), keepdim=True).clamp(min=1)
        exposure = ((lum * mask).sum((2, 3), keepdim=True) / coverage).clamp(min=1e-6)
        fg_depth = torch.where(mask > 0, depth, torch.full_like(depth, float("nan")))
        median = torch.nanmedian(fg_depth.flatten(1), dim=1).values.nan_to_num(1.0).clamp(min=1e-6).view(-1, 1, 1, 1)
        rel_depth = torch.where(mask > 0, torch.log(depth.clamp(min=1e-6) / median), torch.zeros_like(depth))
        extra = [] if visibility is None else [visibility]
        x = torch.cat([torch.log1p(unshadowed / exposure), albedo, normal, ao, rel_depth, mask, *extra], dim=1)

        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False), skip], 1))
        out = self.head(x)[..., :height, :width]
        shadow = torch.sigmoid(out[:, :1])
        if not self.indirect:
            return shadow, torch.zeros_like(unshadowed)
        return shadow, albedo * F.softplus(out[:, 1:]) * exposure
