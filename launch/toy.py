"""The Nash-MTL two-task toy (Navon et al. 2022, Fig. 1): trajectories of each combiner.

    python launch/toy.py --methods=ls,mgda,pcgrad,cagrad,nash_mtl --out=/tmp/toy

For every method, from the five starts (vmapped), Adam lr 1e-3 for 35,000 steps under
``lax.scan``; the two per-task gradients are ``jax.jacrev`` of the two losses and the combiner is
its optax transform chained before Adam (as the official trainer does with its weight methods).
Prints per method and start the end point, the two losses and whether it is in the Pareto set,
writes ``<out>/toy.png`` (trajectories over the loss contours, one panel per method) and
``<out>/toy.json`` (end points).

The Pareto set is computed, not assumed: the Pareto-optimal points of an 801 x 801 grid over
[-10, 10]^2 (spacing 0.025) lie in -7 <= x1 <= 7, -8.43 <= x2 <= -8.05 (REFERENCES.md); an end point
counts as in the Pareto set when it is within ``--tol`` (default 0.05, two grid spacings) of one of
those grid points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mtl_jax import combiners  # noqa: E402
from mtl_jax import toy  # noqa: E402


def run_method(name: str, steps: int, lr: float = 1e-3, starts=toy.STARTS, every: int = 50):
  """``(trajectory (T, S, 2) sampled every ``every`` steps, final x (S, 2))`` for one method."""
  tx = optax.chain(combiners.get(name, 2), optax.adam(lr))
  x0 = jnp.asarray(starts, jnp.float32)

  def one_step(carry, _):
    x, state = carry
    params = {"x": x}
    loss = toy.losses(x)
    jac = jax.jacrev(toy.losses)(x)  # (2, 2): row k = grad of L_k
    updates, state = tx.update({"x": jac}, state, params, task_losses=loss)
    return (optax.apply_updates(params, updates)["x"], state), None

  def chunk(carry, _):
    carry, _ = jax.lax.scan(one_step, carry, None, length=every)
    return carry, carry[0]

  def run(x):
    state = tx.init({"x": x})
    (xf, _), traj = jax.lax.scan(chunk, (x, state), None, length=steps // every)
    return jnp.concatenate([x[None], traj]), xf

  traj, xf = jax.jit(jax.vmap(run, out_axes=(1, 0)))(x0)
  return np.asarray(traj), np.asarray(xf)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="ls,mgda,pcgrad,cagrad,nash_mtl")
  parser.add_argument("--out", default="/tmp/toy")
  parser.add_argument("--steps", type=int, default=35000)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--tol", type=float, default=0.05)
  parser.add_argument("--grid", type=int, default=801)
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in combiners.names():
      parser.error(f"unknown method {m!r}; valid: {', '.join(combiners.names())}")
  every = max(1, min(50, args.steps))
  if args.steps % every:
    parser.error(f"--steps must be a multiple of {every}")
  os.makedirs(args.out, exist_ok=True)

  front, _ = toy.pareto_front_grid(args.grid)
  results, trajs = {}, {}
  for m in methods:
    t0 = time.perf_counter()
    traj, xf = run_method(m, args.steps, args.lr, every=every)
    secs = time.perf_counter() - t0
    trajs[m] = traj
    rows = []
    for s, x in zip(toy.STARTS, xf):
      l1, l2 = (float(v) for v in toy.losses(jnp.asarray(x)))
      dist = float(np.min(np.linalg.norm(front - x[None], axis=1)))
      ok = bool(np.all(np.isfinite(x)) and dist <= args.tol)
      rows.append(dict(start=list(s), end=[float(x[0]), float(x[1])], l1=l1, l2=l2,
                       dist_to_pareto=dist, pareto=ok))
      print(f"{m:>10s}  start ({s[0]:5.1f},{s[1]:5.1f})  end ({x[0]:8.3f},{x[1]:8.3f})  "
            f"L1 {l1:9.4f}  L2 {l2:9.4f}  dist {dist:7.3f}  pareto {'yes' if ok else 'no'}")
    n_ok = sum(r["pareto"] for r in rows)
    print(f"{m:>10s}  {n_ok}/{len(rows)} starts end in the Pareto set  ({secs:.1f} s)")
    results[m] = dict(seconds=secs, runs=rows)

  with open(os.path.join(args.out, "toy.json"), "w") as f:
    json.dump(dict(steps=args.steps, lr=args.lr, tol=args.tol, results=results), f, indent=1)
  if not args.no_plot:
    plot(trajs, front, os.path.join(args.out, "toy.png"))
  print(f"wrote {args.out}/toy.json" + ("" if args.no_plot else f" and {args.out}/toy.png"))
  return results


def figure(trajs, front):
  """The trajectories over the contours of L1 + L2, one panel per method (x1, x2 labelled)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = 200
  xs = np.linspace(-10, 10, n)
  xx, yy = np.meshgrid(xs, xs)
  grid = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), jnp.float32)
  ls = np.asarray(jax.vmap(toy.losses)(grid))
  total = (ls[:, 0] + ls[:, 1]).reshape(n, n)
  fig, axes = plt.subplots(1, len(trajs), figsize=(4 * len(trajs), 4), squeeze=False)
  colors = plt.cm.tab10(np.arange(len(toy.STARTS)))
  for ax, (m, traj) in zip(axes[0], trajs.items()):
    ax.contourf(xx, yy, total, levels=30, cmap="Greys", alpha=0.6)
    ax.scatter(front[:, 0], front[:, 1], s=1, c="tab:red", label="Pareto set")
    for s in range(traj.shape[1]):
      ax.plot(traj[:, s, 0], traj[:, s, 1], color=colors[s], lw=1.5)
      ax.scatter(traj[0, s, 0], traj[0, s, 1], color=colors[s], marker="o", s=20)
      ax.scatter(traj[-1, s, 0], traj[-1, s, 1], color=colors[s], marker="*", s=80)
    ax.set_title(m)
    ax.set_xlabel("x1 (start o, end *)")
    ax.set_ylabel("x2")
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
  axes[0][0].legend(loc="upper left", fontsize=7)
  fig.tight_layout()
  return fig


def plot(trajs, front, path):
  import matplotlib.pyplot as plt
  fig = figure(trajs, front)
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
