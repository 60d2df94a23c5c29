"""The page layouts by name: a leaf module, so the command line's choices and the profiles'
validation read them without importing the renderer (:mod:`.page` draws them)."""

from __future__ import annotations

from typing import Literal, get_args

# One median beat per lead plus the rhythm strip: a T-wave inversion is drawn far taller than on
# a full-length row.
MEDIANS_LAYOUT = "medians+rhythm"
PageLayout = Literal["3x4+rhythm", "6x2", "12x1", "medians+rhythm"]
LAYOUTS: tuple[str, ...] = get_args(PageLayout)
