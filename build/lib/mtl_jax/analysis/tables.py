"""Tables in Markdown, LaTeX (booktabs) and CSV from one description.

A :class:`Table` is a header and rows of cells; a cell is a string, a number, or a
:class:`MeanStd` (rendered ``mean ± std``, and as two columns in CSV so that the numbers stay
machine-readable). Best cells can be marked bold (Markdown ``**``, LaTeX ``\\textbf``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Any, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class MeanStd:
  mean: float
  std: float
  n: int = 1
  bold: bool = False


@dataclasses.dataclass
class Table:
  header: list
  rows: list
  caption: str = ""
  label: str = ""
  digits: int = 4  # significant digits of numbers

  def __post_init__(self):
    for r in self.rows:
      if len(r) != len(self.header):
        raise ValueError(f"row {r!r} has {len(r)} cells for {len(self.header)} columns")


def fmt_number(x: Any, digits: int = 4) -> str:
  """A number with ``digits`` significant digits (integers as they are; NaN as an en dash)."""
  if x is None:
    return "–"
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, int):
    return str(x)
  x = float(x)
  if math.isnan(x):
    return "–"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  if x == 0:
    return "0"
  mag = math.floor(math.log10(abs(x)))
  decimals = max(digits - 1 - mag, 0)
  if abs(x) >= 1e6 or abs(x) < 1e-4:
    return f"{x:.{digits - 1}e}"
  return f"{x:.{decimals}f}"


def _cell_text(c: Any, digits: int, pm: str) -> str:
  if isinstance(c, MeanStd):
    if math.isnan(c.mean):
      return "–"
    if c.n <= 1 or math.isnan(c.std):
      return fmt_number(c.mean, digits)
    return f"{fmt_number(c.mean, digits)}{pm}{fmt_number(c.std, 2)}"
  if isinstance(c, str):
    return c
  return fmt_number(c, digits)


def _bold(c: Any) -> bool:
  return isinstance(c, MeanStd) and c.bold


def to_markdown(t: Table) -> str:
  head = "| " + " | ".join(str(h) for h in t.header) + " |"
  sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(t.header))) + "|"
  lines = [head, sep]
  for r in t.rows:
    cells = []
    for c in r:
      s = _cell_text(c, t.digits, " ± ").replace("|", "\\|")
      cells.append(f"**{s}**" if _bold(c) else s)
    lines.append("| " + " | ".join(cells) + " |")
  out = "\n".join(lines) + "\n"
  if t.caption:
    out = f"*{t.caption}*\n\n" + out
  return out


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "\\": r"\textbackslash{}", "Δ": r"$\Delta$", "±": r"$\pm$", "↓": r"$\downarrow$",
                  "↑": r"$\uparrow$", "–": "--"}


def latex_escape(s: str) -> str:
  return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(s))


def to_latex(t: Table) -> str:
  """A ``table`` with a booktabs ``tabular`` (``\\toprule``, ``\\midrule``, ``\\bottomrule``)."""
  cols = "l" + "r" * (len(t.header) - 1)
  lines = [r"\begin{table}[t]", r"\centering"]
  if t.caption:
    lines.append(r"\caption{" + latex_escape(t.caption) + "}")
  if t.label:
    lines.append(r"\label{" + t.label + "}")
  lines += [r"\begin{tabular}{" + cols + "}", r"\toprule",
            " & ".join(latex_escape(h) for h in t.header) + r" \\", r"\midrule"]
  for r in t.rows:
    cells = []
    for c in r:
      s = latex_escape(_cell_text(c, t.digits, " ± "))
      cells.append(r"\textbf{" + s + "}" if _bold(c) else s)
    lines.append(" & ".join(cells) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
  return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
  """CSV; a :class:`MeanStd` column ``c`` becomes ``c`` (mean) and ``c_std``."""
  ms_cols = {i for i in range(len(t.header)) if any(isinstance(r[i], MeanStd) for r in t.rows)}
  header = []
  for i, h in enumerate(t.header):
    header.append(str(h))
    if i in ms_cols:
      header.append(f"{h}_std")
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  for r in t.rows:
    out = []
    for i, c in enumerate(r):
      if isinstance(c, MeanStd):
        out += [repr(float(c.mean)), repr(float(c.std))]
      else:
        out.append(c if isinstance(c, str) else ("" if c is None else repr(c)))
        if i in ms_cols:
          out.append("")
    w.writerow(out)
  return buf.getvalue()


def mark_best(cells: Sequence[Optional[MeanStd]], higher_is_better: bool) -> list:
  """The cells with the best mean marked bold (ties all bold; NaN never)."""
  vals = [c.mean if isinstance(c, MeanStd) and not math.isnan(c.mean) else None for c in cells]
  finite = [v for v in vals if v is not None]
  if not finite:
    return list(cells)
  best = max(finite) if higher_is_better else min(finite)
  return [dataclasses.replace(c, bold=True) if v is not None and v == best else c
          for c, v in zip(cells, vals)]
