"""Sharing structure (issue 17.3, 17.4, 17.6, 17.8): trees, choose_tree, split/merge, Learning to
Branch, and the planted-cluster benchmark."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from mtl_jax import combiners, models, sharing, tasks as T, train
from mtl_jax.analysis.affinity import partitions
from mtl_jax.configs import synthetic
from mtl_jax.structure import affinity as A, choose as C, dynamic as DY, ltb, surgery, tree as TR

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _all_partitions(k):
  return [tuple(sorted(tuple(g) for g in p)) for n in range(1, k + 1) for p in partitions(k, n)]


def _brute_trees(k, s):
  """Every tuple of S partitions filtered for refinement: an independent enumeration."""
  parts = _all_partitions(k)
  return [tr for tr in itertools.product(parts, repeat=s)
          if all(TR.parents_of(tr[i - 1], tr[i]) is not None for i in range(1, s))]


@pytest.mark.parametrize("k,s", [(1, 2), (3, 2), (4, 2), (3, 3)])
def test_all_trees_is_every_refining_chain(k, s):
  assert sorted(TR.all_trees(k, s)) == sorted(_brute_trees(k, s))


def test_budget_fraction_spans_hard_to_independent():
  assert TR.budget_fraction(TR.hard_tree(4, 3), [5, 3, 2]) == pytest.approx(0.25)
  assert TR.budget_fraction(TR.independent_tree(4, 3), [5, 3, 2]) == pytest.approx(1.0)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(2, 4), s=st.integers(1, 3), seed=st.integers(0, 10**6),
       budget=st.floats(0.0, 1.0), share=st.booleans())
def test_exhaustive_finds_the_optimum_and_agglomerative_is_feasible(k, s, seed, budget, share):
  """``share``: the tree must share a stage (a Gramian combiner's constraint), even at budget 1."""
  rng = np.random.default_rng(seed)
  aff = rng.uniform(-1, 1, (s, k, k))
  sp = rng.integers(1, 20, s).astype(float)
  budget = 1.0 / k + budget * (1.0 - 1.0 / k)
  ok = [tr for tr in _brute_trees(k, s) if TR.budget_fraction(tr, sp) <= budget + 1e-12
        and (not share or any(len(g) > 1 for g in tr[0]))]
  best = min(C.tree_cost(tr, aff) for tr in ok)
  ex = C.choose_tree(aff, sp, budget, "exhaustive", share=share)
  assert ex.cost == pytest.approx(best, abs=1e-9)
  assert ex.fraction <= budget + 1e-12 and ex.tree in ok
  ag = C.choose_tree(aff, sp, budget, "agglomerative", share=share)
  assert ag.fraction <= budget + 1e-12 and ag.tree in ok
  assert ag.cost >= best - 1e-9


def test_local_search_reaches_the_optimum_where_greedy_merges_do_not(monkeypatch):
  """Seed 1 of the random instances (K=5, S=3): greedy merges alone cost 2.94, the reinsertion
  local search reaches the exhaustive optimum 1.92."""
  rng = np.random.default_rng(1)
  k, s = int(rng.integers(4, 7)), int(rng.integers(2, 4))
  aff, sp = rng.uniform(-1, 1, (s, k, k)), rng.integers(1, 20, s).astype(float)
  budget = 1.0 / k + rng.uniform() * (1 - 1.0 / k)
  best = C.choose_tree(aff, sp, budget, "exhaustive").cost
  with_search = C.choose_tree(aff, sp, budget, "agglomerative")
  monkeypatch.setattr(C, "LOCAL_PASSES", 0)
  greedy = C.choose_tree(aff, sp, budget, "agglomerative")
  assert (k, s) == (5, 3) and greedy.cost > best + 0.5
  assert with_search.cost == pytest.approx(best) and with_search.fraction <= budget + 1e-12


# Up to 3 planted blocks. With 4 blocks the heuristic is not always optimal: K=5, S=3, seed 0,
# 4 blocks gives cost 20 against the exhaustive 18 (found by hypothesis 2026-12-06; a known gap of
# the agglomerative heuristic, which is only used for K > 6, left after the local search: the
# optimum needs a merge and a split at once).
@settings(max_examples=15, deadline=None, derandomize=True)
@given(k=st.integers(3, 6), s=st.integers(1, 3), seed=st.integers(0, 10**6),
       extra=st.integers(0, 1))
def test_agglomerative_equals_exhaustive_on_block_affinity(k, s, seed, extra):
  """Planted blocks (affinity 1 inside, -1 across, at every stage) with a budget of exactly one
  copy per block at the last stage: both methods pick the blocks there."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(k) % min(2 + extra, k))
  aff = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)[None].repeat(s, 0)
  sp = np.ones(s)
  blocks = len(set(labels.tolist()))
  budget = ((s - 1) + blocks) / (k * s)
  ex = C.choose_tree(aff, sp, budget, "exhaustive")
  ag = C.choose_tree(aff, sp, budget, "agglomerative")
  assert ag.cost == pytest.approx(ex.cost)
  assert ag.tree[-1] == ex.tree[-1] == tuple(sorted(
      tuple(np.flatnonzero(labels == b).tolist()) for b in set(labels.tolist())))


def test_gramian_combiners_never_get_a_share_nothing_tree():
  """Budget 1 picks the independent networks (cost 0) unless ``share``; Recon's top-k never takes
  stage 0 under ``share`` (nor a stage without conflict)."""
  aff = np.random.default_rng(1).uniform(-1, 1, (3, 4, 4))
  assert C.choose_tree(aff, [1, 1, 1], 1.0).tree == TR.independent_tree(4, 3)
  for method in ("exhaustive", "agglomerative"):
    tr = C.choose_tree(aff, [1, 1, 1], 1.0, method, share=True).tree
    assert TR.shares(tr, [1, 1, 1]) and tr[-1] == TR.independent_tree(4, 1)[0]
  hard = TR.hard_tree(4, 3)
  assert DY.conflict_tree([0.5, 0.2, 0.0], 1, hard) == TR.independent_tree(4, 3)
  assert DY.conflict_tree([0.5, 0.2, 0.0], 1, hard, share=True) == hard[:1] + TR.independent_tree(
      4, 2)
  assert DY.conflict_tree([0.5, 0.0, 0.3], 2, hard, share=True) == hard[:2] + TR.independent_tree(
      4, 1)  # stage 1 has no conflict: only stage 2 is a candidate
  assert DY.conflict_tree([0.5, 0.2], 1, hard[:2], True, [0, 5]) == hard[:2]  # stage 0: no params


def test_choose_tree_bad_input_is_one_line():
  aff = np.zeros((2, 3, 3))
  for call, needle in [(lambda: C.choose_tree(aff, [1, 1], 0.1), "between 1/K"),
                       (lambda: C.choose_tree(aff, [1], 0.5), "one count per stage"),
                       (lambda: C.choose_tree(aff[0], [1], 0.5), "shape \\(S, K, K\\)"),
                       (lambda: C.choose_tree(aff, [1, 1], 0.5, "x"), "valid: auto"),
                       (lambda: C.choose_tree(aff * np.nan, [1, 1], 0.5), "NaN")]:
    with pytest.raises(ValueError, match=needle):
      call()


def test_agglomerative_scales_to_celeba_40():
  aff = np.random.default_rng(0).uniform(-1, 1, (5, 40, 40))
  ch = C.choose_tree(aff, [100, 50, 30, 20, 10], 0.3)
  assert ch.method == "agglomerative" and ch.fraction <= 0.3
  assert TR.canonical(ch.tree, list(range(40)), 5) == ch.tree


# ---------------------------------------------------------------------------------------------
# Split / merge: function-preserving on every backbone of the registry.

TINY = {
    "celeba_cnn": dict(width=0.125, image_size=16),
    "dilated_resnet": dict(width=1 / 32, blocks=(1, 1, 1, 1), image_size=16),
    "lenet": dict(width=0.25),
    "mlp": dict(input_dim=4, widths=(6, 5), batch_norm=True),
    "mpnn": dict(width=0.125, num_passes=1, processing_steps=1, edge_hidden=8),
    "resnet18": dict(width=1 / 16, blocks=(1, 1, 1, 1), image_size=8),
    "segnet": dict(width=1 / 16, levels=2, image_size=8),
    "transformer": dict(width=1 / 32, num_layers=2, num_heads=2, vocab_size=20, max_len=8,
                        dropout=0.0),
}


def test_every_backbone_is_covered():
  assert sorted(TINY) == models.names()


def _trees(num_stages):
  """(hard, mixed, finer): each refines the one before."""
  hard = [[[0, 1, 2]]] * num_stages
  if num_stages == 1:
    return hard, [[[0, 1], [2]]], [[[0], [1], [2]]]
  mixed = [[[0, 1, 2]]] + [[[0, 1], [2]]] * (num_stages - 1)
  finer = [[[0, 1, 2]]] + [[[0, 1], [2]]] * (num_stages - 2) + [[[0], [1], [2]]]
  return hard, mixed, finer


@pytest.mark.parametrize("name", sorted(TINY))
def test_split_preserves_the_function_on_every_backbone(name):
  b = models.get(name, **TINY[name])
  tasks = [T.regression_task(n) for n in "abc"]
  x = b.sample_input()
  trees = _trees(len(b.stages))
  ms = [sharing.get("branched", b, tasks, tree=tr) for tr in trees]

  @jit
  def outputs(v0, v1, v2):
    return [(m.apply(v, x, train=False)[0], m.apply(v, x, train=True)[0])
            for m, v in zip(ms, (v0, v1, v2))]

  v0 = jit(ms[0].init)(jax.random.key(0, impl="rbg"), x)
  v1 = surgery.split(v0, trees[0], trees[1])
  v2 = surgery.split(v1, trees[1], trees[2])
  assert jax.tree.structure(v2) == jax.tree.structure(
      jax.eval_shape(lambda r: ms[2].init(r, x), jax.random.key(0)))
  outs = outputs(v0, v1, v2)
  for other in outs[1:]:
    for a, c in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other)):
      np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)
  back = surgery.merge(surgery.merge(v2, trees[2], trees[1]), trees[1], trees[0])
  for a, c in zip(jax.tree.leaves(v0), jax.tree.leaves(back)):
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)


def test_split_and_merge_reject_the_wrong_direction():
  hard, mixed, _ = _trees(2)
  v = {"params": {"stage_0": {"group_0": {"w": jnp.ones(2)}},
                  "stage_1": {"group_0": {"w": jnp.ones(2)}}}}
  with pytest.raises(ValueError, match="use split"):
    surgery.merge(v, hard, mixed)
  vm = surgery.split(v, hard, mixed)
  with pytest.raises(ValueError, match="use merge"):
    surgery.split(vm, mixed, hard)
  with pytest.raises(ValueError, match="wrong old_tree"):
    surgery.split(v, mixed, mixed)


def test_merge_averages_differing_copies():
  _, mixed, finer = _trees(2)
  v = {"stage_0": {"group_0": {"w": jnp.zeros(2)}},
       "stage_1": {"group_0": {"w": jnp.array([1.0, 2.0]), "n": jnp.array(3)},
                   "group_1": {"w": jnp.array([3.0, 6.0]), "n": jnp.array(5)},
                   "group_2": {"w": jnp.array([7.0, 7.0]), "n": jnp.array(1)}}}
  out = surgery.merge(v, finer, mixed)
  np.testing.assert_allclose(out["stage_1"]["group_0"]["w"], [2.0, 4.0])
  assert int(out["stage_1"]["group_0"]["n"]) == 3  # integers: the first copy
  np.testing.assert_allclose(out["stage_1"]["group_1"]["w"], [7.0, 7.0])


def test_split_of_a_train_state_keeps_training():
  """A trained TrainState (Adam moments, MoCo's per-parameter combiner state) split into a finer
  tree: the predictions are unchanged, moments are copies, and the new model's step runs."""
  names = ["reg0", "reg1", "cls0", "cls1"]
  old = [[names], [names[:2], names[2:]]]
  new = [[names], [[n] for n in names]]
  c = synthetic.get_config("smoke")
  c.model.sharing = "branched"
  c.combiner.name = "moco"
  c.model.sharing_options.tree = old
  state, _ = train.run_steps(c, 2)
  bench, m_old, method, mode = train.build(c)
  c.model.sharing_options.tree = new
  _, m_new, _, _ = train.build(c)
  split = surgery.split(state, m_old.info["tree"], m_new.info["tree"])
  tx = train.make_optimizer(c, int(c.train.num_steps))
  want = jax.eval_shape(lambda: tx.init(split.params))
  assert jax.tree.structure(split.opt_state) == jax.tree.structure(want)
  fresh = jax.eval_shape(lambda: method.transform().init(split.params))
  assert jax.tree.structure(split.combiner_state) == jax.tree.structure(fresh)
  assert "group_3" in str(jax.tree.structure(split.combiner_state))  # MoCo's y is per parameter
  mu_old = state.opt_state[0].mu["stage_1"]["group_1"]  # {cls0, cls1}
  for g in ("group_2", "group_3"):
    jax.tree.map(np.testing.assert_array_equal, split.opt_state[0].mu["stage_1"][g], mu_old)
  batch = next(train.make_train_loader(bench, c, train.make_mesh()))
  preds = [m.apply({"params": s.params}, batch["inputs"])[0]
           for m, s in ((m_old, state), (m_new, split))]
  for t in names:
    np.testing.assert_allclose(preds[0][t], preds[1][t], atol=1e-6)
  mesh = train.make_mesh()
  mask = combiners.resolve_mask(m_new.shared_mask, jax.device_get(split.params))
  step = train.make_train_step(m_new, list(bench.tasks), method, tx, mesh, mode=mode,
                               shared_mask=mask)
  after, metrics = step(split, train.shard_batch(batch, mesh))
  assert bool(metrics["finite"]) and int(after.step) == 3


# ---------------------------------------------------------------------------------------------
# Planted clusters (issue 17.8): tasks 0, 1 read one latent factor, tasks 2, 3 another; the last
# stage is a one-unit bottleneck, so the two clusters conflict there.


def planted(n=256, d=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  za, zb = x[:, 0], x[:, 1]
  noise = lambda: 0.05 * rng.normal(size=n)
  y = {"t0": za + noise(), "t1": 0.5 * za + noise(), "t2": zb + noise(), "t3": 0.5 * zb + noise()}
  return {"inputs": x, "targets": {k: v.astype(np.float32) for k, v in y.items()}}


PLANTED = (((0, 1, 2, 3),), ((0, 1), (2, 3)))


@pytest.fixture(scope="module")
def planted_setup():
  b = models.get("mlp", input_dim=6, widths=(8, 1), activation="tanh")
  tasks = [T.regression_task(f"t{k}") for k in range(4)]
  return b, tasks, planted()


def test_affinity_and_choose_tree_recover_the_planted_split(planted_setup):
  b, tasks, batch = planted_setup
  m = sharing.get("hard", b, tasks)
  v = jit(m.init)(jax.random.key(0), batch["inputs"])
  loss_fn = train.make_loss_fn(m, tasks, False, {})
  tx = optax.adam(1e-2)

  @jit
  def warm_up(p):  # hard-shared warm-up (300 full-batch Adam steps on the sum of the losses)
    def body(_, carry):
      p, o = carry
      g = jax.grad(lambda q: jnp.sum(loss_fn(q, {}, batch, jax.random.key(0))[0]))(p)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o
    return jax.lax.fori_loop(0, 300, body, (p, tx.init(p)))[0]

  warm = {"params": warm_up(v["params"])}
  aff = A.stage_affinity(m, warm, tasks, [batch], lookahead_lr=0.1)
  cos = aff.cosine
  assert cos.shape == (2, 4, 4) and aff.steps == 1
  assert cos[1, 0, 1] > 0.5 and cos[1, 2, 3] > 0.5 and cos[1, 0, 2] < -0.5
  # TAG's lookahead: a step for t0 at the bottleneck lowers t1's loss and raises t2's.
  z = aff.lookahead
  assert z.shape == (2, 4, 4) and z[1, 0, 1] > 0 and z[1, 0, 2] < 0 and z[1, 2, 3] > 0
  tag = A.normalised_lookahead(z)
  # First order: Z_{i->j} = lr g_i.g_j / L_j + O(lr^2) (the same compiled program: lr is traced).
  small = A.stage_affinity(m, warm, tasks, [batch], lookahead_lr=1e-4)
  losses = np.asarray(loss_fn(warm["params"], {}, batch, jax.random.key(0))[0])
  np.testing.assert_allclose(small.lookahead, 1e-4 * small.gramian / losses, rtol=0.02,
                             atol=0.02 * 1e-4 * np.abs(small.gramian / losses).max())
  np.testing.assert_allclose(np.diagonal(tag, axis1=1, axis2=2), 1.0)
  sp = C.stage_param_counts(b)
  assert sp == [6 * 8 + 8, 8 + 1]
  one_split = (sp[0] + 2 * sp[1]) / (4 * sum(sp))  # room for two copies of the last stage only
  for method in ("exhaustive", "agglomerative"):
    assert C.choose_tree(cos, sp, one_split, method).tree == PLANTED
    assert C.choose_tree(tag, sp, one_split, method).tree == PLANTED
  # With room for two copies of every stage, the first stage splits along the clusters too.
  assert C.choose_tree(cos, sp, 0.5).tree[0] == ((0, 1), (2, 3))


def test_learn_to_branch_recovers_the_planted_split(planted_setup):
  b, tasks, batch = planted_setup
  res = ltb.learn_to_branch(b, tasks, itertools.repeat(batch), num_steps=300, nodes=(1, 2),
                            learning_rate=1e-2, seed=0)
  assert res.tree == PLANTED
  assert res.losses.shape == (300, 4) and np.all(np.isfinite(res.losses))
  heads = res.probabilities["branch_heads"]
  assert heads.shape == (4, 2) and np.all(heads.max(1) > 0.5)


def test_tree_from_logits_follows_the_paths():
  params = {"branch_heads": np.array([[0, 9.0], [0, 9.0], [9.0, 0], [0, 0.5]]),
            "branch_1": np.array([[9.0, 0], [0, 9.0]])}
  assert ltb.tree_from_logits(params, 2, 4) == (((0, 1, 3), (2,)), ((0, 1, 3), (2,)))
  params["branch_1"] = np.array([[9.0, 0], [9.0, 0]])
  assert ltb.tree_from_logits(params, 2, 4) == (((0, 1, 2, 3),), ((0, 1, 3), (2,)))
  tau = ltb.temperature(jnp.array([0, 100]), 100)
  np.testing.assert_allclose(tau, [5.0, 0.5], rtol=1e-6)
