"""What each method is for the reader and the analysis, in one table: its id (as :data:`bnlib.norms.REGISTRY` names
it), display name, short name, colour, line family, whether its training forward pass normalises with the current
batch and whether its gradient flows through the batch's statistics; the table's order is the registry's. With it:
the panels figures group methods into, the families' line styles, the original study's five methods, the headline
figure's methods and the 2x2's corners. No torch: the book's pages and the analysis read it without the layers
(tests/test_house.py holds it to the registry, both ways).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# One colour-blind-safe palette for the whole book: Okabe & Ito's, without its yellow (unreadable as a line on
# white), with grey for "no normalisation". Black is BN's alone: BN is the reference drawn in every panel.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
    "grey": "#999999",
}

BATCH, RUNNING = "batch statistics in training", "running statistics in training"
ORIGINAL_CODE, INDEPENDENT, NONE = "running statistics, the original's code", "batch-independent", "no normalisation"
# The line families, in the order legends list them: dash pattern (matplotlib on/off lengths in points; () is a
# solid line) and the pattern's name for the key under the figures.
FAMILY_LINES = {
    BATCH: ((), "solid"),
    RUNNING: ((5, 2), "dashed"),
    ORIGINAL_CODE: ((6, 2, 1.5, 2), "dash-dot"),
    INDEPENDENT: ((1.5, 1.5), "dotted"),
    NONE: ((9, 3), "long dashes"),
}


@dataclass(frozen=True)
class MethodFacts:
    id: str
    name: str  # in tables, legends and prose
    colour: str  # an OKABE_ITO name; colours repeat across the book, never within a panel
    family: str  # a FAMILY_LINES key: the line style
    short: str  # where prose names it often ("BNRS")
    # where the current batch enters training, for the methods the one-class reading groups (None: not grouped)
    forward_uses_batch: bool | None = None
    gradient_through_batch: bool | None = None

    @property
    def hex(self) -> str:
        return OKABE_ITO[self.colour]


def _row(id, name, colour, family, short=None, forward_uses_batch=None, gradient_through_batch=None) -> MethodFacts:
    return MethodFacts(id, name, colour, family, short or name, forward_uses_batch, gradient_through_batch)


# fmt: off
# id, display name, colour, line family[, short name[, forward pass uses the batch, gradient through it]]
TABLE = (
    _row("bn", "BN", "black", BATCH, "BN", True, True),
    _row("bnrs", "BN, running stats (BNRS)", "vermillion", RUNNING, "BNRS", False, False),
    _row("brn", "Batch Renorm (BRN)", "blue", RUNNING, "BRN", False, True),
    _row("brnc", "Batch Renorm, clipped (BRNC)", "bluish green", RUNNING),
    _row("brnc_warmup", "BRNC, paper's warm-up", "sky blue", RUNNING),
    _row("bnrs_orig", "BNRS as the original", "reddish purple", ORIGINAL_CODE),
    _row("brn_orig", "BRN as the original", "sky blue", ORIGINAL_CODE),
    _row("brnc_orig", "BRNC as the original", "orange", ORIGINAL_CODE),
    _row("bnwos", "BN without sync (BNWoS)", "orange", BATCH),
    _row("bn_detached", "BN, no gradient through mu_B, var_B", "sky blue", BATCH, "bn_detached", True, False),
    _row("bn_detached_mean", "BN, no gradient through mu_B", "bluish green", BATCH, "bn_detached_mean", True, True),
    _row("bn_detached_var", "BN, no gradient through var_B", "reddish purple", BATCH, "bn_detached_var", True, True),
    _row("bn_detached_to_bn", "BN, no gradient, filter norms of BN", "blue", BATCH),
    _row("bnrs_to_bn", "BNRS, filter norms of BN", "vermillion", RUNNING),
    _row("bn_to_bn_detached", "BN, filter norms of BN with no gradient", "bluish green", BATCH),
    _row("bn_detached_wd", "BN, no gradient, filters decayed", "orange", BATCH),
    _row("bnrs_wd", "BNRS, filters decayed", "reddish purple", RUNNING),
    _row("bnrs_m001", "BNRS, momentum 0.01", "sky blue", RUNNING),
    _row("bnrs_m003", "BNRS, momentum 0.03", "blue", RUNNING),
    _row("bnrs_m030", "BNRS, momentum 0.3", "orange", RUNNING),
    _row("bnrs_m100", "BNRS, momentum 1", "reddish purple", RUNNING),
    _row("bnrs_orig_m001", "BNRS as the original, momentum 0.01", "sky blue", ORIGINAL_CODE),
    _row("bnrs_orig_m003", "BNRS as the original, momentum 0.03", "blue", ORIGINAL_CODE),
    _row("bnrs_orig_m030", "BNRS as the original, momentum 0.3", "orange", ORIGINAL_CODE),
    _row("bnrs_orig_m100", "BNRS as the original, momentum 1", "bluish green", ORIGINAL_CODE),
    _row("online", "Online Norm", "orange", RUNNING, "Online Norm", False, False),
    _row("cbn", "Cross-Iteration BN (CBN)", "bluish green", RUNNING, "CBN", True, True),
    _row("gbn", "Ghost BN (16 per ghost batch)", "vermillion", BATCH),
    _row("mabn", "Moving Average BN (MABN)", "reddish purple", RUNNING),
    _row("bln", "Batchless Norm (BLN)", "sky blue", RUNNING),
    _row("gn", "GroupNorm (GN)", "bluish green", INDEPENDENT, "GN", False, False),
    _row("gn_ws", "GN + Weight Std (GN+WS)", "sky blue", INDEPENDENT),
    _row("frn", "Filter Response Norm (FRN)", "orange", INDEPENDENT),
    _row("evonorm", "EvoNorm-S0", "reddish purple", INDEPENDENT),
    _row("none", "No normalisation", "grey", NONE),
)
# fmt: on
METHODS = {m.id: m for m in TABLE}  # by id, in the registry's order

# The panels of every figure with many methods, in reading order: at most five methods each, and BN in every one
# as the reference (a figure draws the panels whose methods it has).
PANELS = {
    "BN and its variants": ("bnwos", "gbn", "bn_detached", "bn_detached_mean", "bn_detached_var"),
    "running statistics in training": ("bnrs", "brn", "brnc", "brnc_warmup"),
    "other statistics for small batches": ("mabn", "bln", "online", "cbn"),
    "BNRS's momentum": ("bnrs_m001", "bnrs_m003", "bnrs", "bnrs_m030", "bnrs_m100"),
    "running statistics, the original's code": ("bnrs_orig", "brn_orig", "brnc_orig"),
    "the original's BNRS, its momentum": (
        "bnrs_orig_m001",
        "bnrs_orig_m003",
        "bnrs_orig",
        "bnrs_orig_m030",
        "bnrs_orig_m100",
    ),
    "batch-independent": ("gn", "gn_ws", "frn", "evonorm", "none"),
    "filter norms set or decayed": (
        "bn_detached_to_bn",
        "bnrs_to_bn",
        "bn_to_bn_detached",
        "bn_detached_wd",
        "bnrs_wd",
    ),
}
ORIGINAL = ("bn", "bnrs", "brn", "brnc", "bnwos")  # the original study's five methods
# Arms built to take a method apart or to intervene on it, not to be used: "what to use" leaves them out
ABLATIONS = (*PANELS["filter norms set or decayed"], "bn_detached", "bn_detached_mean", "bn_detached_var")
# The headline figure's methods: BN, the two ways of normalising with running statistics in training, and the
# batch-independent reference
HEADLINE = ("bn", "bnrs", "brn", "gn")


DEFAULT_MOMENTUM = 0.1  # BNRS's running statistics' momentum (torch's), unless swept
_SWEPT = re.compile(r"_m(\d{3})$")  # the registry names a swept momentum in hundredths: bnrs_m030 is 0.3


def momentum(method: str) -> float:
    """The momentum of a BNRS arm's running statistics (the momentum panels' methods), read off its id by the
    registry's naming rule (the swept arms' suffix, else the default); tests/test_house.py holds it to the layers
    the registry builds."""
    swept = _SWEPT.search(method)
    return int(swept.group(1)) / 100 if swept else DEFAULT_MOMENTUM


def name(method: str) -> str:
    """The method's display name (an unknown id is shown as it is)."""
    return METHODS[method].name if method in METHODS else method


def short(method: str) -> str:
    return METHODS[method].short if method in METHODS else method
