"""The cost of measuring the sharing structure (issue 17.2): ``launch/benchmark.py structure``.

On a config's model (hard sharing as a one-group ``branched`` tree, the trainer's own
:func:`mtl_jax.train.make_train_step`, one real training batch), three steps of the same
combiner, all in the engine's ``jacobian`` mode (the mode that already forms the whole Gramian):

* ``jacobian``: the plain step (what a run that does not measure trains with);
* ``stage_gramians``: the measuring step of ``structure.method='affinity'`` /
  ``'conflict'``, the same step with one ``gramian_groups`` entry per stage (each stage's K x K
  Gramian, from the engine's per-layer terms);
* ``lookahead``: the measuring step of ``structure.affinity='lookahead'`` (TAG's lookahead per
  stage: the per-task gradients again and K forward passes per stage).

Each is timed ``steps`` calls per round (non-donating, the same state and batch; after a
compiling and a warm-up call), the three interleaved over ``repeats`` rounds, so load on a shared
machine falls on all three alike; the ratios are the medians of the per-round ratios. Issue 17.2's
bound: ``stage_gramians / jacobian <= 1.10``. The lookahead's ratio is reported, with no bound
(it is allowed to cost more).
"""

from __future__ import annotations

import statistics
import time

STAGE_BOUND = 1.10  # issue 17.2: the per-stage Gramians add <= 10% to the whole-Gramian step
ROWS = ("jacobian", "stage_gramians", "lookahead")


def _steps(config):
  """``(steps {row: fn}, state, batch)`` for ``config`` (structure method forced to 'affinity')."""
  import jax  # pylint: disable=g-import-not-at-top

  from mtl_jax import combiners, train  # pylint: disable=g-import-not-at-top
  config.structure.method = "affinity"
  config.engine.mode = "jacobian"
  bench, model, method, _ = train.build(config)
  mesh = train.make_mesh(None)
  tx = train.make_optimizer(config, 100)
  state, constants = train.init_state(config, model, bench, method, tx, mesh)
  mask = combiners.resolve_mask(model.shared_mask, jax.device_get(state.params))
  kw = dict(mode="jacobian", multi_input=bench.multi_input, shared_mask=mask,
            constants=constants, per_device_batches=bench.per_device_batches,
            layer_gramian=config.engine.layer_gramian, donate=False)
  stages = len(model.info["tree"])
  lr = float(config.optimizer.learning_rate)
  steps = {"jacobian": train.make_train_step(model, list(bench.tasks), method, tx, mesh, **kw),
           "stage_gramians": train.make_train_step(model, list(bench.tasks), method, tx, mesh,
                                                   stage_gramians=stages, **kw),
           "lookahead": train.make_train_step(model, list(bench.tasks), method, tx, mesh,
                                              stage_gramians=stages, lookahead_lr=lr, **kw)}
  batch = train.shard_batch(next(train.make_train_loader(bench, config, mesh)), mesh)
  info = {"num_tasks": len(bench.tasks), "num_stages": stages, "combiner": method.name,
          "num_params": int(model.num_params(jax.device_get(state.params)))}
  return steps, state, batch, info


def run(config, steps: int, repeats: int) -> dict:
  """One config's row: per-step seconds of the three steps (median over rounds), the ratios to
  ``jacobian`` (median of the per-round ratios), compile seconds, and the bound's verdict."""
  import jax  # pylint: disable=g-import-not-at-top
  fns, state, batch, info = _steps(config)
  compile_s = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(state, batch))  # compiles
    compile_s[name] = time.perf_counter() - t0
    jax.block_until_ready(fn(state, batch))  # warm-up
  rounds = {name: [] for name in fns}
  for _ in range(max(int(repeats), 1)):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(max(int(steps), 1)):
        out = fn(state, batch)
      jax.block_until_ready(out)
      rounds[name].append((time.perf_counter() - t0) / max(int(steps), 1))
  ratio = {name: statistics.median(a / b for a, b in zip(rounds[name], rounds["jacobian"]))
           for name in fns if name != "jacobian"}
  return {**info, "step_s": {n: statistics.median(r) for n, r in rounds.items()},
          "rounds_s": rounds, "ratio_to_jacobian": ratio, "compile_s": compile_s,
          "check": {"name": "stage_gramians_overhead", "bound": STAGE_BOUND,
                    "value": ratio["stage_gramians"], "ok": ratio["stage_gramians"] <= STAGE_BOUND}}


def format_rows(rows: list) -> str:
  lines = [f"{'config':34s} {'K':>3s} {'S':>2s} {'jacobian ms':>12s} {'+stage G':>9s} "
           f"{'+lookahead':>11s}  bound"]
  for r in rows:
    ms = 1e3 * r["step_s"]["jacobian"]
    q = r["ratio_to_jacobian"]
    verdict = "ok" if r["check"]["ok"] else "OVER"
    lines.append(f"{r['config']:34s} {r['num_tasks']:3d} {r['num_stages']:2d} {ms:12.2f} "
                 f"{q['stage_gramians']:9.3f} {q['lookahead']:11.3f}  "
                 f"<= {STAGE_BOUND} {verdict}")
  return "\n".join(lines)
