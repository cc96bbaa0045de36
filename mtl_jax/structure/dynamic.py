"""The sharing structure during training: ``config.structure`` (read by :func:`mtl_jax.train.fit`).

Methods (``config.structure.method``):

* ``'none'``: the model that ``config.model.sharing`` builds, unchanged.
* ``'fixed'``: a ``branched`` network over ``config.structure.tree`` for the whole run.
* ``'affinity'``: the run starts hard-shared (or on ``structure.tree``). During the ``window``
  steps before ``warmup_steps`` the train step is the engine's ``jacobian`` mode with one
  ``gramian_groups`` entry per stage (:func:`mtl_jax.autodiff.combine`), so each step gives the
  K x K Gramian of every stage's shared parameters from its own backward pass; the host averages
  their cosine matrices (:class:`Window`). At ``warmup_steps``
  :func:`mtl_jax.structure.choose.choose_tree` picks, among the trees that refine the current one
  and fit ``budget``, the one with the lowest clustering cost on that affinity, and
  :func:`mtl_jax.structure.surgery.split` copies parameters, optimizer moments, batch statistics
  and combiner state into it (the predictions do not change); training goes on with a step
  compiled once for the new tree. ``split_steps`` repeat the measure-and-split.
* ``'conflict'`` (Recon, Shi et al. ICLR 2023): the same window measures each stage's conflict
  score, the fraction of (step, task pair) with gradient cosine below ``conflict_threshold``; the
  ``top_k`` stages with the highest score become task-specific.
* ``'learn_to_branch'`` (Guo et al. ICML 2020): :func:`mtl_jax.structure.ltb.learn_to_branch`
  searches for ``warmup_steps`` steps on the training batches, the discretised tree is then
  trained as a ``branched`` network for the run's ``num_steps`` (from scratch, as the paper does).

``restart=True`` (affinity, conflict) retrains the chosen tree from scratch after the measuring
steps, as Recon, TAG and Vandenhende et al. do: fresh parameters from the run's seed, a fresh
optimizer, the data from its first batch; the run is then ``warmup_steps + num_steps`` steps and
its last ``num_steps`` are exactly a ``fixed`` run of the chosen tree.

``affinity`` (``config.structure.affinity``): ``'cosine'`` (the default) reads the per-stage
gradient cosine, the first-order term of TAG's lookahead, from the Gramians the engine forms
anyway; ``'lookahead'`` reads TAG's lookahead affinity itself (Fifty et al. 2021: the loss change
of task j after a step on task i's gradient alone), per stage: the measuring step also steps each
stage's shared parameters along each task's gradient (vmapped over the K tasks) at the optimizer's
learning rate and evaluates the K losses
(:func:`mtl_jax.structure.affinity.lookahead_losses`; deviations listed there). The train step
outside the windows is unchanged.

Deviations. TAG measures its affinity in one run and then trains each chosen group as its own
network; here the groups become branches of one network that keeps its training state.
Vandenhende et al. (2020) measure representation similarity of single-task networks and retrain;
here the running model's gradients decide and the split keeps training (``restart`` retrains).
Recon makes individual layers task-specific, possibly with shared layers after them; a task tree
cannot join tasks it has separated, so here every stage from the earliest of the ``top_k`` chosen
stages on becomes task-specific (with ``top_k`` counted in stages, not layers), and its score is
the conflict fraction over one window rather than over a whole statistics run.

A combiner that needs a Gramian (Nash-MTL, MGDA, PCGrad, ...: ``needs`` other than ``losses``)
weighs the gradients of the shared parameters, so with one a split never leaves nothing shared:
``affinity`` excludes the independent networks from the trees it chooses among
(``choose_tree(share=True)``), ``conflict`` never turns stage 0 task-specific (Recon itself keeps
the least conflicting layers shared). The split record's ``share`` says when the rule applied.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mtl_jax.structure import choose as C
from mtl_jax.structure import tree as T

METHODS = ("none", "fixed", "affinity", "conflict", "learn_to_branch")
AFFINITIES = ("cosine", "lookahead")  # config.structure.affinity: what method 'affinity' reads
MEASURED = ("affinity", "conflict")  # methods whose splits read the engine's stage Gramians


class StructureError(ValueError):
  """A ``config.structure`` problem, in one line."""


def check(s, sharing: str) -> None:
  """One-line :class:`StructureError` for an invalid ``config.structure`` block."""
  if s.method not in METHODS:
    from mtl_jax.config_utils import one_of  # pylint: disable=g-import-not-at-top
    raise StructureError(str(one_of("config.structure.method", s.method, METHODS)))
  if s.choose not in C.METHODS:
    from mtl_jax.config_utils import one_of  # pylint: disable=g-import-not-at-top
    raise StructureError(str(one_of("config.structure.choose", s.choose, C.METHODS)))
  if s.method == "none":
    return
  if sharing not in ("hard", "branched"):
    raise StructureError(f"config.structure.method={s.method!r} changes a branched network; "
                         f"config.model.sharing must be hard or branched, got {sharing!r}")
  if s.method == "fixed" and not s.tree:
    raise StructureError("config.structure.method='fixed' needs config.structure.tree (per stage, "
                         "a list of groups of tasks)")
  if s.method in MEASURED + ("learn_to_branch",) and int(s.warmup_steps) < 1:
    raise StructureError(f"config.structure.warmup_steps must be >= 1 for {s.method!r}, got "
                         f"{s.warmup_steps}")
  if s.split_steps and s.method != "affinity":
    raise StructureError(f"config.structure.split_steps is for method 'affinity', not "
                         f"{s.method!r}")
  if s.method in MEASURED:
    if not 1 <= int(s.window) <= int(s.warmup_steps):
      raise StructureError(f"config.structure.window must be in 1..warmup_steps "
                           f"({s.warmup_steps}), got {s.window}")
    if not 0.0 < float(s.budget) <= 1.0:
      raise StructureError(f"config.structure.budget is a fraction in (0, 1] of the independent "
                           f"networks' stage parameters, got {s.budget}")
    steps = list(schedule(s))
    if any(b - a < int(s.window) for a, b in zip(steps, steps[1:])):
      raise StructureError(f"config.structure.split_steps must increase after warmup_steps by at "
                           f"least window ({s.window}) each, got {tuple(s.split_steps)}")
  if s.restart and s.method not in MEASURED:
    raise StructureError(f"config.structure.restart is for methods affinity and conflict, not "
                         f"{s.method!r}")
  if s.restart and s.split_steps:
    raise StructureError("config.structure.restart retrains once: no split_steps with it")
  if s.get("affinity", "cosine") not in AFFINITIES:
    from mtl_jax.config_utils import one_of  # pylint: disable=g-import-not-at-top
    raise StructureError(str(one_of("config.structure.affinity", s.affinity, AFFINITIES)))
  if s.get("affinity", "cosine") == "lookahead" and s.method != "affinity":
    raise StructureError(f"config.structure.affinity='lookahead' is for method 'affinity', not "
                         f"{s.method!r}")
  if s.method == "conflict" and int(s.top_k) < 1:
    raise StructureError(f"config.structure.top_k must be >= 1, got {s.top_k}")
  if s.method == "learn_to_branch" and float(s.tau_start) <= 0:
    raise StructureError(f"config.structure.tau_start must be > 0, got {s.tau_start}")


def schedule(s) -> tuple:
  """The steps after which the structure is measured and split (affinity / conflict)."""
  if s.method not in MEASURED:
    return ()
  later = tuple(int(t) for t in s.split_steps) if s.method == "affinity" else ()
  return (int(s.warmup_steps),) + later


def measuring(s, step: int) -> bool:
  """Whether the step that starts at ``step`` (steps done) lies in a measuring window."""
  return any(t - int(s.window) <= step < t for t in schedule(s))


def initial_tree(config) -> Optional[list]:
  """The tree a run starts from: ``structure.tree``, else a branched ``sharing_options.tree``,
  else None (hard sharing)."""
  if config.structure.tree:
    return _plain(config.structure.tree)
  if config.model.sharing == "branched":
    return config.model.sharing_options.to_dict().get("tree")
  return None


def _plain(tree):
  return [[list(g) for g in stage] for stage in tree]


class Window:
  """Host sums over a measuring window of the per-stage Gramians (S, K, K), their cosines and
  the conflict indicator; float64, kept in the checkpoint (:meth:`to_json`) so a resumed run
  averages exactly what the uninterrupted one does."""

  def __init__(self, threshold: float = 0.0):
    self.threshold = float(threshold)
    self.gram = self.cos = self.conflict = self.lookahead = None
    self.n = 0

  def add(self, stage_gramians, lookahead=None) -> None:
    """One measuring step: its (S, K, K) stage Gramians and, with ``affinity='lookahead'``, its
    (S, K, K) TAG lookahead affinity (summed as it is: normalised at the end)."""
    if lookahead is not None:
      z = np.asarray(lookahead, np.float64)
      self.lookahead = z if self.lookahead is None else self.lookahead + z
    g = np.asarray(stage_gramians, np.float64)
    d = np.sqrt(np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0.0, None))
    denom = d[:, :, None] * d[:, None, :]
    cos = np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), 0.0)
    k = g.shape[-1]
    off = ~np.eye(k, dtype=bool)
    live = denom > 0  # pairs of tasks that both have a gradient at this stage
    conf = np.sum((cos < self.threshold) & off & live, axis=(1, 2)) / max(k * (k - 1), 1)
    if self.n == 0:
      self.gram, self.cos, self.conflict = g, cos, conf
    else:
      self.gram, self.cos, self.conflict = self.gram + g, self.cos + cos, self.conflict + conf
    self.n += 1

  def means(self):
    if not self.n:
      raise ValueError("a measuring window with no finite step: nothing to choose a tree from")
    return self.gram / self.n, self.cos / self.n, self.conflict / self.n

  def lookahead_mean(self) -> Optional[np.ndarray]:
    return None if self.lookahead is None else self.lookahead / self.n

  def to_json(self) -> Optional[dict]:
    if not self.n:
      return None
    return {"n": self.n, "threshold": self.threshold, "gram": self.gram.tolist(),
            "cos": self.cos.tolist(), "conflict": self.conflict.tolist(),
            "lookahead": None if self.lookahead is None else self.lookahead.tolist()}

  @classmethod
  def from_json(cls, d: Optional[dict], threshold: float) -> "Window":
    w = cls(threshold)
    if d:
      w.n = int(d["n"])
      w.gram, w.cos, w.conflict = (np.asarray(d[k], np.float64) for k in ("gram", "cos",
                                                                         "conflict"))
      if d.get("lookahead") is not None:
        w.lookahead = np.asarray(d["lookahead"], np.float64)
    return w


def conflict_tree(scores: Sequence[float], top_k: int, current: tuple, share: bool = False,
                  stage_params: Optional[Sequence[float]] = None) -> tuple:
  """Recon on a tree: the ``top_k`` stages with the highest (positive) conflict score, and every
  stage after the earliest of them, become task-specific; earlier stages keep ``current``'s
  groups. A stage without conflict (score 0) is never chosen.

  ``share=True`` (a combiner that needs a Gramian over shared parameters): a stage is a candidate
  only when the stages before it keep a copy shared by two tasks or more (``stage_params``: one
  count per stage, parameter-free stages share nothing); so stage 0 never is, and the tree always
  shares a prefix of the network."""
  scores = np.asarray(scores, np.float64)
  sp = [1.0] * len(current) if stage_params is None else [float(n) for n in stage_params]
  cand = [s for s in range(len(scores)) if scores[s] > 0 and (
      not share or T.shares(current[:s], sp[:s]))]
  if not cand:
    return current
  order = sorted(cand, key=lambda s: (-scores[s], s))
  first = min(order[:int(top_k)])
  singletons = tuple((k,) for k in range(sum(len(g) for g in current[0])))
  return tuple(p if s < first else singletons for s, p in enumerate(current))


def decide(s, window: Window, current: tuple, stage_params: Sequence[float], step: int,
           task_names: Sequence[str], share: bool = False) -> dict:
  """The split record of ``step``: the new tree (canonical, in ``'tree'`` as lists) and the
  affinity that chose it. ``share``: the tree must keep a stage shared by two tasks or more (the
  combiner needs a Gramian over shared parameters; see :func:`choose.choose_tree`,
  :func:`conflict_tree`)."""
  gram, cos, conf = window.means()
  z = window.lookahead_mean()
  aff = cos
  if s.method == "affinity" and s.get("affinity", "cosine") == "lookahead":
    if z is None:
      raise ValueError("config.structure.affinity='lookahead' but the window holds no lookahead")
    from mtl_jax.structure import affinity as A  # pylint: disable=g-import-not-at-top
    aff = A.normalised_lookahead(z)
  if s.method == "affinity":
    choice = C.choose_tree(aff, stage_params, float(s.budget), s.choose, within=current,
                           share=share)
    new, extra = choice.tree, {"cost": choice.cost, "chooser": choice.method}
  else:
    new = conflict_tree(conf, int(s.top_k), current, share, stage_params)
    extra = {"top_k": int(s.top_k)}
  return {"step": int(step), "method": s.method, "tree": T.to_list(new),
          "describe": T.format_tree(new, task_names),
          "fraction": T.budget_fraction(new, stage_params), "window_steps": window.n,
          "affinity": aff.tolist(), "cosine": cos.tolist(), "conflict": conf.tolist(),
          "gramian": gram.tolist(), "share": bool(share),
          **({"lookahead": z.tolist()} if z is not None else {}), **extra}
