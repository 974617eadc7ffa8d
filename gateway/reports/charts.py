"""Charts for the reports: PNG bytes drawn with matplotlib's Agg backend (no display, no
pyplot global state: each chart is its own Figure on its own FigureCanvasAgg).

Chart titles and axis labels are bilingual when a CJK font is installed (Debian
``fonts-noto-cjk``); without one, Japanese glyphs would render as boxes, so charts fall
back to English labels (the surrounding HTML stays bilingual either way)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gateway.i18n import Text

CJK_FAMILIES = ("Noto Sans CJK JP", "Noto Sans JP", "IPAexGothic", "IPAGothic", "TakaoGothic")
BAR_COLOUR = "#b03a2e"     # blocks: a muted red
ALT_COLOUR = "#2e6f9e"


def find_cjk_font() -> str | None:
    """The first installed CJK font family matplotlib can use, or None."""
    from matplotlib import font_manager

    for family in CJK_FAMILIES:
        try:
            font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        return family
    return None


@dataclass(frozen=True)
class ChartMaker:
    """``cjk_family``: a font family with Japanese glyphs, or None for English-only labels."""

    cjk_family: str | None = None
    dpi: int = 100

    def label(self, text: Text) -> str:
        return f"{text.ja} / {text.en}" if self.cjk_family else text.en

    def _figure(self, width: float, height: float) -> Figure:
        fig = Figure(figsize=(width, height), dpi=self.dpi, layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    def _font(self) -> dict:
        return {"family": [self.cjk_family, "DejaVu Sans"]} if self.cjk_family else {}

    def _png(self, fig: Figure) -> bytes:
        buffer = io.BytesIO()
        fig.canvas.print_png(buffer)
        return buffer.getvalue()

    def bars(self, title: Text, labels: Sequence[str], values: Sequence[int], *,
             colour: str = BAR_COLOUR, axis: Text | None = None) -> bytes:
        """Horizontal bar chart, largest at the top."""
        font = self._font()
        height = max(2.2, 0.9 + 0.32 * len(labels))
        fig = self._figure(9, height)
        ax = fig.add_subplot()
        positions = list(range(len(labels)))
        ax.barh(positions, list(values), color=colour)
        ax.set_yticks(positions, [_shorten(label) for label in labels], fontdict=font or None, fontsize=9)
        ax.invert_yaxis()
        ax.set_title(self.label(title), fontdict=font or None, fontsize=11, loc="left")
        if axis is not None:
            ax.set_xlabel(self.label(axis), fontdict=font or None, fontsize=9)
        for position, value in zip(positions, values):
            ax.annotate(f"{value:,}", (value, position), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.margins(x=0.12)
        return self._png(fig)

    def daily(self, title: Text, days: Sequence[date], values: Sequence[int], *,
              colour: str = BAR_COLOUR, axis: Text | None = None) -> bytes:
        """One bar per day of the period."""
        font = self._font()
        fig = self._figure(10, 3.2)
        ax = fig.add_subplot()
        positions = list(range(len(days)))
        ax.bar(positions, list(values), color=colour)
        ax.set_xticks(positions, [d.strftime("%d") for d in days], fontsize=8)
        ax.set_title(self.label(title), fontdict=font or None, fontsize=11, loc="left")
        if axis is not None:
            ax.set_ylabel(self.label(axis), fontdict=font or None, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
        return self._png(fig)


def _shorten(label: str, limit: int = 48) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"
