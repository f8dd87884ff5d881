"""The screen-space shadow (and bounce-light) estimator: a UNet applied to the shader's output.

shaded = unshadowed * shadow + indirect. Inputs are the unshadowed image divided by its foreground
mean luminance (then log1p), albedo, normal, AO, log depth relative to the median, and the mask, so
the shadow does not depend on exposure and the whole pipeline stays linear in the HDRI's strength.
The default model's net works on the physical screen-space terms (backend/screenspace.py): their
visibility and indirect light are inputs, and the net's outputs are bounded corrections of them, so it
refines what the depth buffer shows and cannot invent shadows or bounce light where there is none.
The paper-faithful variant (base 64, depth 4, no indirect term) follows the paper's UNet on
(unshadowed, normal, AO) and predicts the shadow from the images alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_CHANNELS = 12  # unshadowed 3, albedo 3, normal 3, ao, depth, mask (+ visibility 1, indirect 3)
TRANSPORT_CHANNELS = 4
MAX_LOG_INDIRECT = 1.5  # the net scales the physical indirect light by exp(+-1.5) at most


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.GroupNorm(min(8, outputs), outputs),
                         nn.SiLU(), nn.Conv2d(outputs, outputs, 3, padding=1), nn.SiLU())


def composite(unshadowed: torch.Tensor, shadow: torch.Tensor, indirect: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """The shaded image (B, 3, H, W): unshadowed x shadow + indirect on the foreground, never below 0 (the
    reflections take away the sky they replace and can overshoot it)."""
    return (unshadowed * shadow + indirect).clamp(min=0) * (mask > 0)


def refine_visibility(visibility: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """The physical visibility moved towards 1 (t > 0) or 0 (t < 0) by t = tanh(logit): exactly it at 0,
    always within [0, 1]."""
    t = torch.tanh(logit)
    return visibility + t * torch.where(t > 0, 1 - visibility, visibility)


class ShadowNet(nn.Module):
    """transport=True (the default model): refines the physical screen-space terms; with a zero head (as it
    is initialised) the shadow is the visibility and the indirect light the physical bounce + reflections.
    transport=False (the paper's variant): predicts shadow (and bounce light) from the images alone."""

    def __init__(self, base: int = 16, depth: int = 3, indirect: bool = True, transport: bool = False):
        super().__init__()
        if transport and not indirect:
            raise ValueError("a transport shadow net refines the indirect light too (indirect=True)")
        self.base, self.depth, self.indirect, self.transport = base, depth, indirect, transport
        widths = [base * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        channels = INPUT_CHANNELS + TRANSPORT_CHANNELS * transport
        for width in widths:
            self.down.append(_block(channels, width))
            channels = width
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(base, 4 if indirect else 1, 1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start at the physical terms, or near "no shadow, no bounce light"
            start = [0.0] * 4 if transport else [4.0, -8.0, -8.0, -8.0]
            self.head.bias.copy_(torch.tensor(start[: self.head.out_channels]))

    def config(self) -> dict:
        return {"arch": "unet", "base": self.base, "depth": self.depth, "indirect": self.indirect,
                "transport": self.transport}

    @property
    def is_identity(self) -> bool:
        """A transport net with an all-zero head passes the physical terms through unchanged."""
        return not (self.head.weight.any() or self.head.bias.any())

    @property
    def multiple(self) -> int:
        """Image sizes are padded to a multiple of this."""
        return 2 ** (self.depth - 1)

    def forward(self, unshadowed, albedo, normal, ao, depth, mask, visibility=None, indirect=None):
        """Images as (B, C, H, W); returns (shadow (B, 1, H, W) in [0, 1], indirect (B, 3, H, W); >= 0 but for
        the transport net's reflections, which replace sky by darker objects).
        visibility (B, 1, H, W) and indirect (B, 3, H, W), the physical terms, are required by, and only given
        to, a net built with transport=True."""
        if (visibility is not None, indirect is not None) != (self.transport, self.transport):
            raise ValueError(f"this shadow net {'needs the' if self.transport else 'takes no'} transport inputs "
                             "(visibility and indirect)")
        if self.transport and not torch.is_grad_enabled() and self.is_identity:
            return visibility, indirect  # what a zero head gives, without the UNet's cost (not while training)
        weights = torch.tensor([0.2126, 0.7152, 0.0722], device=unshadowed.device).view(1, 3, 1, 1)
        lum = (unshadowed * weights).sum(1, keepdim=True)
        coverage = mask.sum((2, 3), keepdim=True).clamp(min=1)
        exposure = ((lum * mask).sum((2, 3), keepdim=True) / coverage).clamp(min=1e-6)
        fg_depth = torch.where(mask > 0, depth, torch.full_like(depth, float("nan")))
        median = torch.nanmedian(fg_depth.flatten(1), dim=1).values.nan_to_num(1.0).clamp(min=1e-6).view(-1, 1, 1, 1)
        rel_depth = torch.where(mask > 0, torch.log(depth.clamp(min=1e-6) / median), torch.zeros_like(depth))
        extra = [visibility, torch.asinh(indirect / exposure)] if self.transport else []  # indirect may be < 0
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
        if self.transport:
            return (refine_visibility(visibility, out[:, :1]),
                    indirect * torch.exp(MAX_LOG_INDIRECT * torch.tanh(out[:, 1:])))
        shadow = torch.sigmoid(out[:, :1])
        if not self.indirect:
            return shadow, torch.zeros_like(unshadowed)
        return shadow, albedo * F.softplus(out[:, 1:]) * exposure
