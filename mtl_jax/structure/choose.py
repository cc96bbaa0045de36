"""Choosing a task tree from per-stage task affinity under a parameter budget.

Vandenhende, Georgoulis, De Brabandere, Van Gool, "Branched Multi-Task Networks: Deciding What
Layers To Share", BMVC 2020, Section 3.2: with the dissimilarity ``D_s = 1 - A_s`` of the tasks at
stage ``s`` (``A_s`` an affinity in [-1, 1], 1 = the tasks want the same thing there), a tree's
clustering cost sums, over stages and groups, how dissimilar the tasks that share a copy are; among
the trees whose parameter count fits the budget, the one with the lowest cost is chosen.

``cost(tree) = sum_s sum_{g in P_s} sum_{i in g} max_{j in g} D_s[i, j]``

(each task's most dissimilar partner at each stage; singleton groups cost 0).

* ``method='exhaustive'`` enumerates every tree (:func:`mtl_jax.structure.tree.all_trees`); the
  default for K <= 6 (K = 6 and 4 stages: 44,590 trees, about a second).
* ``method='agglomerative'`` (the default above 6 tasks: CelebA-40, QM9-11): bottom-up, from the
  independent networks, repeatedly apply the merge with the smallest cost increase per parameter
  saved until the tree fits the budget. Merging groups ``a`` and ``b`` at stage ``s`` also merges
  their ancestors that differ (so the result is still a tree), and saves those stages' copies.
  Then a local search refines it: repeatedly take one task out of the tree and put it back at
  the position (the path to any group at any stage, a singleton below it; or a singleton
  throughout) that lowers the cost most within the budget, until no move helps (at most
  ``LOCAL_PASSES`` passes over the tasks). A heuristic, not guaranteed optimal. On 60 random
  instances with K = 4..6 (checked against the exhaustive optimum) the local search improved 20
  greedy results and made 47 of 60 optimal (mean gap to the optimum 0.55 -> 0.23); it never makes
  one worse. Known gap: K=5, S=3 with 4 planted blocks still costs 20 against 18, the optimum
  needing one stage's merge and another's split at once (a single reinsertion exceeds the budget).

Ties (equal cost) go to the tree with fewer parameters, then to the first canonical tree.

``share=True`` (the trainer sets it for a combiner that needs a Gramian: Nash-MTL, MGDA, PCGrad,
...) adds a constraint: the tree must share at least one stage's copy between two tasks (the
independent networks, cost 0 and always the cheapest in cost, are excluded even at ``budget=1``):
such a combiner's Gramian is over the shared parameters, and a tree that shares none leaves it
nothing to weigh.

Deviations from Vandenhende et al.: (1) their cluster cost averages the tasks' maximum distance
within a cluster and sums over clusters; here the tasks' maxima are summed (a cluster weighs by
its size), so that merging never lowers the cost and a stage's cost does not depend on how many
groups it has; (2) their affinity is representation similarity (RSA) of single-task networks;
here any per-stage K x K affinity is accepted (:mod:`mtl_jax.structure.affinity` measures gradient
cosines of the running model); (3) their budget counts parameters or FLOPs; here the stage
parameters of the tree over those of the independent networks (:func:`tree.budget_fraction`).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Sequence

import numpy as np

from mtl_jax.structure import tree as T

METHODS = ("auto", "exhaustive", "agglomerative")
EXHAUSTIVE_MAX_TASKS = 6
LOCAL_PASSES = 10  # agglomerative: passes of the reinsertion local search over the tasks


class Choice(NamedTuple):
  tree: tuple  # canonical
  cost: float  # clustering cost (lower is better)
  fraction: float  # parameters over the independent networks'
  method: str  # 'exhaustive' or 'agglomerative'


def _dissimilarity(affinity) -> np.ndarray:
  a = np.asarray(affinity, np.float64)
  if a.ndim != 3 or a.shape[1] != a.shape[2]:
    raise ValueError(f"affinity: one K x K matrix per stage, shape (S, K, K); got {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError("affinity holds NaN or Inf")
  d = 1.0 - 0.5 * (a + np.swapaxes(a, 1, 2))  # symmetrised (TAG's lookahead is not symmetric)
  idx = np.arange(a.shape[1])
  d[:, idx, idx] = 0.0
  return d


def _group_cost(d: np.ndarray, g) -> float:
  if len(g) < 2:
    return 0.0
  sub = d[np.ix_(g, g)]
  return float(sub.max(axis=1).sum())


def tree_cost(tree, affinity) -> float:
  """The clustering cost of ``tree`` (canonical) for per-stage ``affinity`` (S, K, K)."""
  d = _dissimilarity(affinity)
  return sum(_group_cost(d[s], list(g)) for s, p in enumerate(tree) for g in p)


def _check(d, stage_params, budget):
  s, k = d.shape[0], d.shape[1]
  if len(stage_params) != s:
    raise ValueError(f"stage_params: one count per stage ({s}), got {len(stage_params)}")
  if any(float(n) < 0 for n in stage_params) or not sum(float(n) for n in stage_params) > 0:
    raise ValueError(f"stage_params must be >= 0 with a positive sum, got {list(stage_params)}")
  if not 1.0 / k - 1e-12 <= float(budget) <= 1.0 + 1e-12:
    raise ValueError(f"budget is a fraction of the independent networks' parameters between "
                     f"1/K = {1.0 / k:.4g} (hard sharing) and 1 (independent), got {budget}")


def _refines(tr, within) -> bool:
  return within is None or all(T.parents_of(w, p) is not None for w, p in zip(within, tr))


def _exhaustive(d, stage_params, budget, within=None, share=False):
  k, s = d.shape[1], d.shape[0]
  memo = {}

  def cost_of(stage, g):
    key = (stage, g)
    if key not in memo:
      memo[key] = _group_cost(d[stage], list(g))
    return memo[key]

  best = None
  for tr in T.all_trees(k, s):
    frac = T.budget_fraction(tr, stage_params)
    if frac > budget + 1e-12 or not _refines(tr, within) or (
        share and not T.shares(tr, stage_params)):
      continue
    c = sum(cost_of(i, g) for i, p in enumerate(tr) for g in p)
    if best is None or c < best[0] - 1e-12 or (abs(c - best[0]) <= 1e-12 and frac < best[1] - 1e-12):
      best = (c, frac, tr)
  return best


def _merge(tr, s, a, b):
  """``tr`` with groups ``a``, ``b`` of stage ``s`` merged, and their differing ancestors."""
  ga, gb = set(tr[s][a]), set(tr[s][b])
  out = list(tr)
  for t in range(s, -1, -1):
    pa = [g for g in out[t] if ga & set(g)]
    pb = [g for g in out[t] if gb & set(g)]
    if pa == pb:
      break
    union = tuple(sorted(pa[0] + pb[0]))
    out[t] = tuple(sorted([g for g in out[t] if g not in (pa[0], pb[0])] + [union]))
  return tuple(out)


def _agglomerative(d, stage_params, budget, within=None, share=False):
  k, s = d.shape[1], d.shape[0]
  tr = T.independent_tree(k, s)
  memo = {}

  def gc(stage, g):  # group cost, memoised over the whole run (most pairs recur)
    if (stage, g) not in memo:
      memo[(stage, g)] = _group_cost(d[stage], list(g))
    return memo[(stage, g)]

  while T.budget_fraction(tr, stage_params) > budget + 1e-12 or (
      share and not T.shares(tr, stage_params)):
    par = T.parents(tr)
    best = None
    for stage in range(s):
      for a, b in itertools.combinations(range(len(tr[stage])), 2):
        if within is not None and T.group_of(within[stage], tr[stage][a][0]) != T.group_of(
            within[stage], tr[stage][b][0]):
          continue  # the tree must refine ``within``: never join what it separated
        delta, saved, t, ia, ib = 0.0, 0.0, stage, a, b
        while t >= 0 and ia != ib:  # this stage and the ancestors that differ merge
          ga, gb = tr[t][ia], tr[t][ib]
          delta += gc(t, tuple(sorted(ga + gb))) - gc(t, ga) - gc(t, gb)
          saved += stage_params[t]
          ia, ib, t = par[t][ia], par[t][ib], t - 1
        if saved <= 0:  # a parameter-free stage: merging there buys nothing
          continue
        key = (delta / saved, delta, stage, a, b)
        if best is None or key < best:
          best = key
    if best is None:  # ``within`` itself: no coarser tree refines it
      break
    tr = _merge(tr, *best[2:])
  tr = _local_search(tr, gc, stage_params, budget, within, share)
  cost = sum(gc(i, g) for i, p in enumerate(tr) for g in p)
  return cost, T.budget_fraction(tr, stage_params), tr


def _without(tr, k):
  """``tr`` with task ``k`` removed (empty groups dropped)."""
  return tuple(tuple(g2 for g2 in (tuple(t for t in g if t != k) for g in p) if g2) for p in tr)


def _reinsertions(base, k):
  """Every tree that puts task ``k`` back into ``base`` (which lacks it): along the path to a
  group of some stage (joining it and its ancestors, a singleton below), or alone throughout."""
  yield tuple(tuple(sorted(p + ((k,),))) for p in base)
  for s, p in enumerate(base):
    for g in p:
      out, member = [], set(g)
      for t, q in enumerate(base):
        if t <= s:
          out.append(tuple(sorted(tuple(sorted(h + (k,))) if member & set(h) else h for h in q)))
        else:
          out.append(tuple(sorted(q + ((k,),))))
      yield tuple(out)


def _local_search(tr, gc, stage_params, budget, within, share):
  """Task reinsertion moves from ``tr`` while one lowers the cost within the constraints."""
  cost = lambda t: sum(gc(i, g) for i, p in enumerate(t) for g in p)
  ok = lambda t: (T.budget_fraction(t, stage_params) <= budget + 1e-12 and _refines(t, within)
                  and (not share or T.shares(t, stage_params)))
  best = cost(tr)
  k = sum(len(g) for g in tr[0])
  for _ in range(LOCAL_PASSES):
    improved = False
    for task in range(k):
      for cand in _reinsertions(_without(tr, task), task):
        c = cost(cand)
        if c < best - 1e-12 and ok(cand):
          tr, best, improved = cand, c, True
    if not improved:
      break
  return tr


def choose_tree(affinity, stage_params: Sequence[float], budget: float,
                method: str = "auto", within=None, share: bool = False) -> Choice:
  """The tree with the lowest clustering cost whose stage parameters are at most ``budget`` (a
  fraction of the independent networks': 1/K = hard sharing, 1 = independent).

  Args:
    affinity: (S, K, K) per-stage task affinity (e.g. the gradient cosine of
      :func:`mtl_jax.structure.affinity.stage_affinity`, or TAG's lookahead affinity).
    stage_params: the parameters of one copy of each stage (S numbers).
    budget: the parameter budget, in [1/K, 1].
    method: ``'auto'`` (exhaustive for K <= 6, else agglomerative), ``'exhaustive'``,
      ``'agglomerative'``.
    within: a canonical tree the result must refine (a running branched model's current tree:
      a split can only separate tasks). When even ``within`` exceeds the budget, ``within`` is
      returned (nothing to split).
    share: the tree must share a stage's copy between two tasks or more (a combiner that needs a
      Gramian over shared parameters); the independent networks are never returned.
  """
  if method not in METHODS:
    raise ValueError(f"unknown choose_tree method {method!r}; valid: {', '.join(METHODS)}")
  d = _dissimilarity(affinity)
  _check(d, stage_params, budget)
  if method == "auto":
    method = "exhaustive" if d.shape[1] <= EXHAUSTIVE_MAX_TASKS else "agglomerative"
  fn = _exhaustive if method == "exhaustive" else _agglomerative
  sp = [float(n) for n in stage_params]
  if within is not None:
    within = T.canonical(within, list(range(d.shape[1])), d.shape[0])
    if T.budget_fraction(within, sp) >= float(budget) - 1e-12:
      return Choice(within, tree_cost(within, affinity), T.budget_fraction(within, sp), method)
  best = fn(d, sp, float(budget), within, share)
  if best is None or (share and not T.shares(best[2], sp)):
    raise ValueError("choose_tree: no tree fits the budget and shares a stage's parameters "
                     "(share=True): raise the budget or use share=False")
  cost, frac, tr = best
  return Choice(tr, float(cost), float(frac), method)


def stage_param_counts(backbone, sample_inputs=None) -> list:
  """Parameters of one copy of each stage of ``backbone`` (from shapes; nothing is computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import sharing, tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  model = sharing.get("hard", backbone, [tasks_lib.regression_task("t")])
  x = sample_inputs if sample_inputs is not None else backbone.sample_input()
  shapes = jax.eval_shape(lambda r: model.module.init({"params": r, "dropout": r}, x, train=False),
                          jax.random.key(0))["params"]
  return [model.num_params(shapes.get(f"stage_{s}", {})) for s in range(len(backbone.stages))]


def describe(choice: Choice, task_names: Optional[Sequence[str]] = None) -> str:
  names = task_names or [str(k) for k in range(sum(len(g) for g in choice.tree[0]))]
  return (f"{T.format_tree(choice.tree, names)} (cost {choice.cost:.4g}, "
          f"{100 * choice.fraction:.1f}% of independent, {choice.method})")
