"""The original study's network, with the normalisation method and its placement as options.

    [conv 3x3, dilation 2^i, padding 2^i -> norm -> GELU] x depth -> global average pool -> linear

``norm_position``: ``pre`` (norm before the activation, as above: the original study) or ``post``
(conv -> GELU -> norm, as Batchless Normalization's authors run it).

``norm_placement``: ``all`` (a norm after every conv, the original study), ``first`` (after the first conv
only: can fewer BN layers be better?) or ``none``. A conv followed by a norm has no bias (the norm's beta
replaces it); one without a norm keeps its bias. That depends on the placement only, so for a given seed
every method starts from identical weights. With ``mabn`` the convs followed by a norm centre their
weights (:class:`bnlib.norms.WeightCentredConv2d`), with ``gn_ws`` they standardise them
(:class:`bnlib.norms.WeightStandardisedConv2d`); same parameters, same initial values. With the norm
after the activation every conv keeps its bias (beta no longer replaces it). Methods that include their
activation (``frn``, ``evonorm``) replace the GELU after every conv they follow.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import norms

PLACEMENTS = ("all", "first", "none")
POSITIONS = ("pre", "post")


class Net(nn.Module):
    def __init__(
        self,
        method: str,
        in_channels: int,
        num_classes: int,
        width: int = 32,
        depth: int = 4,
        norm_placement: str = "all",
        norm_options: dict | None = None,
        norm_position: str = "pre",
    ):
        super().__init__()
        if norm_placement not in PLACEMENTS:
            raise ValueError(f"unknown norm_placement {norm_placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if norm_position not in POSITIONS:
            raise ValueError(f"unknown norm_position {norm_position!r}; choose one of {', '.join(POSITIONS)}")
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be positive, got width={width}, depth={depth}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            normed = norm_placement == "all" or (norm_placement == "first" and i == 0)
            spec = norms.spec(method)
            conv_cls = spec.conv if normed and spec.conv else nn.Conv2d
            dilation = 2**i
            layers.append(
                conv_cls(
                    channels, width, 3, padding=dilation, dilation=dilation, bias=not normed or norm_position == "post"
                )
            )
            norm = [norms.make(method, width, **(norm_options or {}))] if normed else []
            if norm and hasattr(norm[0], "meet_conv"):
                norm[0].meet_conv(layers[-1])
            if normed and spec.includes_activation:  # FRN, EvoNorm: the norm is the activation
                layers.extend(norm)
            else:
                layers.extend([*norm, nn.GELU()] if norm_position == "pre" else [nn.GELU(), *norm])
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def build(method: str, seed: int, in_channels: int, num_classes: int, **options) -> Net:
    """The model of ``method`` with initial weights that depend on ``seed`` only."""
    # Seeding a private generator through fork_rng leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net(method, in_channels, num_classes, **options)
