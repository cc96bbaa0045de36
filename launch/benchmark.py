"""Benchmarks of the library, as subcommands.

    python launch/benchmark.py params --backbone=celeba_cnn --num_tasks=40 --out=params.json

``params``: the parameter count of every sharing strategy for a backbone and K tasks (one-unit
binary heads, as CelebA's), its ratio to K single-task models, and a JSON file
``{strategy: count, ..., "single_task": count of one single-task model}``. Counts come from
shapes only (``jax.eval_shape``), so even large backbones cost seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {}  # name -> (add_arguments, run)


def subcommand(name: str, add_arguments: Callable):
  """Register ``run(args)`` as subcommand ``name`` (other benchmarks add theirs the same way)."""

  def deco(fn):
    SUBCOMMANDS[name] = (add_arguments, fn)
    return fn

  return deco


def _parse_options(items: Sequence[str]) -> dict:
  out = {}
  for item in items or ():
    if "=" not in item:
      raise SystemExit(f"option {item!r} is not KEY=VALUE")
    key, value = item.split("=", 1)
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def param_report(backbone_name: str, num_tasks: int, backbone_options: Optional[dict] = None,
                 strategies: Optional[Sequence[str]] = None,
                 strategy_options: Optional[dict] = None) -> dict:
  """``{strategy: count, ..., 'single_task': count}`` for ``num_tasks`` binary tasks."""
  from mtl_jax import models, sharing, tasks as T

  if int(num_tasks) < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
  backbone = models.get(backbone_name, **(backbone_options or {}))
  if backbone.sample_input is None:
    raise ValueError(f"backbone {backbone_name!r} has no sample_input to count parameters with")
  sample = backbone.sample_input()
  tasks = [T.binary_task(f"task_{k}") for k in range(int(num_tasks))]
  names = list(strategies) if strategies else sharing.names()
  report = {}
  for name in names:
    opts = (strategy_options or {}).get(name, {})
    report[name] = sharing.get(name, backbone, tasks, **opts).param_count(sample)
  report["single_task"] = sharing.get("hard", backbone, tasks[:1]).param_count(sample)
  return report


def format_report(report: dict, num_tasks: int) -> str:
  single = report["single_task"]
  lines = [f"{'strategy':<14}{'parameters':>14}{'/ (K x STL)':>14}{'x STL':>9}"]
  for name, count in sorted(report.items(), key=lambda kv: kv[1]):
    if name == "single_task":
      continue
    lines.append(f"{name:<14}{count:>14,}{count / (num_tasks * single):>14.4f}"
                 f"{count / single:>9.2f}")
  lines.append(f"{'single_task':<14}{single:>14,}   (K x STL = {num_tasks * single:,})")
  return "\n".join(lines)


def _params_args(p: argparse.ArgumentParser):
  p.add_argument("--backbone", default="celeba_cnn")
  p.add_argument("--num_tasks", type=int, default=40)
  p.add_argument("--out", default="", help="write the JSON report here")
  p.add_argument("--strategies", default="", help="comma-separated (default: all)")
  p.add_argument("--backbone_option", action="append", default=[], metavar="KEY=VALUE",
                 help="backbone option, e.g. width=0.5 (repeatable; VALUE is JSON)")


@subcommand("params", _params_args)
def run_params(args) -> dict:
  strategies = [s for s in args.strategies.split(",") if s] or None
  report = param_report(args.backbone, args.num_tasks, _parse_options(args.backbone_option),
                        strategies)
  print(f"{args.backbone}, K = {args.num_tasks} tasks")
  print(format_report(report, args.num_tasks))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, sort_keys=True)
  return report


def main(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (add_arguments, _) in SUBCOMMANDS.items():
    add_arguments(sub.add_parser(name))
  args = parser.parse_args(argv)
  return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
