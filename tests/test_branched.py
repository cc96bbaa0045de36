"""The ``branched`` sharing strategy (issue 17.1): extremes, bad trees, shared mask, combiners."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import autodiff, combiners, models, sharing, tasks as T
from mtl_jax.structure import tree as TR

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
MIXED = [[[0, 1, 2]], [[0, 1], [2]]]  # stage 1: {a,b} shared, {c} task-specific


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def mlp():
  return models.get("mlp", input_dim=4, widths=(6, 5), batch_norm=True)


def three_tasks():
  return [T.binary_task("a"), T.regression_task("b"), T.classification_task("c", 3)]


def data(n=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = {"a": (rng.random(n) > 0.5).astype(np.float32), "b": rng.normal(size=n).astype(np.float32),
       "c": rng.integers(0, 3, n).astype(np.int32)}
  return x, y


def _outputs(name, **opts):
  model = sharing.get(name, mlp(), three_tasks(), **opts)
  x, _ = data()

  @jit
  def run(key):
    v = model.init(key, x)
    return v, model.apply(v, x, train=False)[0], model.apply(v, x, train=True)[0]

  v, ev, tr = run(_key(3))
  return model, v, ev, tr


@pytest.mark.parametrize("ref,tree", [("hard", None), ("hard", [[[0, 1, 2]]] * 2),
                                      ("independent", [[["a"], ["b"], ["c"]]] * 2)],
                         ids=["hard-default", "hard-explicit", "independent"])
def test_extremes_equal_hard_and_independent(ref, tree):
  m_ref, v_ref, ev_ref, tr_ref = _outputs(ref)
  m, v, ev, tr = _outputs("branched", tree=tree)
  assert m.num_params(v["params"]) == m_ref.num_params(v_ref["params"])
  assert m.param_count() == m_ref.param_count()
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  for s in range(2):  # same key -> the same parameter values (up to the programs' rounding)
    ref_stage = v_ref["params"][f"stage_{s}" if ref == "hard" else f"tower_{s}"]
    groups = v["params"][f"stage_{s}"]
    for j, g in enumerate(sorted(groups)):
      want = ref_stage if ref == "hard" else jax.tree.map(lambda a, j=j: a[j], ref_stage)
      jax.tree.map(close, groups[g], want)
  for t in ("a", "b", "c"):  # -> the same outputs (up to the two programs' float rounding)
    np.testing.assert_allclose(ev[t], ev_ref[t], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tr[t], tr_ref[t], rtol=1e-6, atol=1e-6)
  shared = m.shared_mask(v["params"])
  assert any(jax.tree.leaves(shared)) == (ref == "hard")
  assert not any(jax.tree.leaves({k: s for k, s in shared.items() if k.startswith("head_")}))


def test_mixed_tree_masks_params_and_gradients():
  m, v, ev, _ = _outputs("branched", tree=MIXED)
  assert m.info["describe"] == "stage 0: {a,b,c} | stage 1: {a,b} {c}"
  assert m.options["tree"] == [[[0, 1, 2]], [[0, 1], [2]]]
  assert set(v["params"]["stage_1"]) == {"group_0", "group_1"}
  assert set(v["batch_stats"]["stage_1"]) == {"group_0", "group_1"}
  mask = m.shared_mask(v["params"])
  assert all(jax.tree.leaves(mask["stage_0"])) and all(jax.tree.leaves(mask["stage_1"]["group_0"]))
  assert not any(jax.tree.leaves(mask["stage_1"]["group_1"]))
  x, y = data()
  tasks = three_tasks()

  @jit
  def jac(params):
    def losses(p):
      preds, _ = m.apply(dict(v, params=p), x, train=True)
      return jnp.stack([t.loss(preds[t.name], y[t.name]) for t in tasks])
    return jax.jacrev(losses)(params)

  j = jac(v["params"])
  nz = lambda tree: np.array([float(sum(np.abs(np.asarray(a[k])).sum() for a in jax.tree.leaves(tree)))
                              for k in range(3)]) > 0
  np.testing.assert_array_equal(nz(j["stage_0"]), [True, True, True])
  np.testing.assert_array_equal(nz(j["stage_1"]["group_0"]), [True, True, False])
  np.testing.assert_array_equal(nz(j["stage_1"]["group_1"]), [False, False, True])
  with pytest.raises(ValueError, match="single shared representation"):
    m.encode(v, x)


@pytest.mark.parametrize("tree,needle", [
    ([[[0, 1]], [[0, 1, 2]]], "stage 0 misses task\\(s\\) c"),
    ([[[0, 1, 2]], [[0, 1], [1, 2]]], "task 'b' is in two groups"),
    ([[[0, 1], [2]], [[0, 2], [1]]], "does not refine stage 0"),
    ([[[0, 1, 2]]], "one partition per backbone stage \\(2\\)"),
    ([[[0, 1, 2]], [["z"], [0, 1, 2]]], "unknown task 'z'; valid: a, b, c"),
    ([[[0, 1, 2]], [[0, 1, 5]]], "out of range"),
    ([[[0, 1, 2]], [[], [0, 1, 2]]], "non-empty list of tasks"),
    ("abc", "one partition per stage"),
])
def test_bad_tree_is_one_line(tree, needle):
  with pytest.raises(ValueError, match=needle) as e:
    sharing.get("branched", mlp(), three_tasks(), tree=tree)
  assert "\n" not in str(e.value)


def test_canonical_orders_groups_and_hard_tree_has_a_split():
  assert TR.canonical([[[2, 1, 0]], [[2], [1, 0]]], ["a", "b", "c"], 2) == (((0, 1, 2),),
                                                                          ((0, 1), (2,)))
  m = sharing.get("branched", mlp(), three_tasks())
  assert m.has_split
  x, _ = data()
  v = jit(m.init)(_key(), x)
  z, _ = m.encode(v, x)
  preds, _ = m.decode(v, z)
  full, _ = m.apply(v, x)
  for t in full:
    np.testing.assert_allclose(preds[t], full[t], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every combiner trains on a branched model (issue 17, "every combiner trains on a branched model").


@pytest.fixture(scope="module")
def branched_setup():
  """The mixed-tree model, its variables, data, shared mask, and its losses and Jacobian at the
  initial parameters (one jit)."""
  tasks = three_tasks()
  m = sharing.get("branched", mlp(), tasks, tree=MIXED)
  x, y = data(8)
  v = jit(m.init)(_key(1), x)
  mask = combiners.resolve_mask(m.shared_mask, v["params"])

  def losses_of(p, bs):
    preds, upd = m.apply(dict(v, params=p, batch_stats=bs), x, train=True)
    return jnp.stack([t.loss(preds[t.name], y[t.name]) for t in tasks]), upd["batch_stats"]

  losses0, jac0 = jit(lambda p: (losses_of(p, v["batch_stats"])[0],
                                 jax.jacrev(lambda q: losses_of(q, v["batch_stats"])[0])(p)))(
                                     v["params"])
  return m, v, mask, losses_of, losses0, jac0


def _train(method, loss_fn, params, aux, mask, mode, steps=3):
  tx = optax.adam(1e-2)

  @jit
  def step(p, a, cs, os):
    out = autodiff.combine(method, cs, loss_fn, p, a, mode=mode, shared_mask=mask)
    upd, os = tx.update(out.update, os, p)
    return optax.apply_updates(p, upd), out.aux, out.state, os, out.losses, out.finite

  p, a = params, aux
  cs, os = method.transform(mask).init(p), tx.init(p)
  losses = []
  for _ in range(steps):
    p, a, cs, os, l, ok = step(p, a, cs, os)
    assert bool(ok), method.name
    losses.append(np.asarray(l))
  assert np.all(np.isfinite(losses))
  return p


def _check_moved(before, after, name):
  for part in (("stage_0",), ("stage_1", "group_0"), ("stage_1", "group_1"), ("head_c",)):
    a, b = before, after
    for key in part:
      a, b = a[key], b[key]
    moved = max(float(np.max(np.abs(np.asarray(u) - np.asarray(w))))
                for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert moved > 0, (name, part)


@pytest.mark.parametrize("cname", combiners.names())
def test_every_combiner_trains_on_branched(cname, branched_setup):
  """Every combiner, 3 steps, on the branched tree's parameters and shared mask. The loss is the
  model's first-order expansion at the initial point (its losses and Jacobian there are the
  model's), so each combiner compiles a small program; the real model runs in the next test."""
  m, v, mask, _, losses0, jac0 = branched_setup
  p0 = v["params"]
  method = combiners.method(cname, 3)

  def loss_fn(p, aux):
    lin = sum(jnp.tensordot(j, q - q0, axes=q.ndim)
              for j, q, q0 in zip(jax.tree.leaves(jac0), jax.tree.leaves(p), jax.tree.leaves(p0)))
    return losses0 + lin + 0.5 * sum(jnp.sum(jnp.square(q - q0)) for q, q0 in
                                     zip(jax.tree.leaves(p), jax.tree.leaves(p0))), aux

  _check_moved(p0, _train(method, loss_fn, p0, {}, mask, autodiff.default_mode(method)), cname)


@pytest.mark.parametrize("cname", ["ls", "pcgrad"])
def test_combiners_train_the_real_branched_model(cname, branched_setup):
  m, v, mask, losses_of, _, _ = branched_setup
  method = combiners.method(cname, 3)
  p = _train(method, losses_of, v["params"], v["batch_stats"], mask, autodiff.default_mode(method))
  _check_moved(v["params"], p, cname)
