"""Sharing strategies over a tiny MLP and a tiny conv backbone (issue 3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from mtl_jax import autodiff, combiners, models, sharing, tasks as T
from mtl_jax.models.base import Backbone
from mtl_jax.models.celeba_cnn import ConvBlock
from mtl_jax.sharing import sparse as S
from mtl_jax.sharing import towers

OPTIONS = {"hierarchical": {"depths": [1, 2, 2]}}

# The suite's cost is XLA compilation of tiny programs, not running them: compile without LLVM's
# optimisation passes (same semantics, a fraction of the compile time), run each check as one jitted
# program instead of op-by-op dispatch, and initialise with the cheap 'rbg' PRNG.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def mlp(batch_norm=True):
  return models.get("mlp", input_dim=4, widths=(6, 5), batch_norm=batch_norm)


def tiny_conv():
  stages = (functools.partial(ConvBlock, features=(2,), pool="max"),
            functools.partial(ConvBlock, features=(3,), pool="none"))
  return Backbone("tiny_conv", stages, (2, 3),
                  sample_input=lambda: np.zeros((2, 4, 4, 3), np.float32))


def three_tasks():
  return [T.binary_task("a"), T.regression_task("b"), T.classification_task("c", 3)]


def data(backbone, n=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n,) + backbone.sample_input().shape[1:]).astype(np.float32)
  y = {"a": (rng.random(n) > 0.5).astype(np.float32), "b": rng.normal(size=n).astype(np.float32),
       "c": rng.integers(0, 3, n).astype(np.int32)}
  return x, y


def build(name, backbone, tasks=None):
  tasks = tasks or three_tasks()
  model = sharing.get(name, backbone, tasks, **OPTIONS.get(name, {}))
  x, y = data(backbone)
  variables = jit(model.init)(_key(0), x)
  return model, tasks, variables, x, y


_MODELS = {}


def compiled(name):
  """(model, tasks, variables, x, y, fn) for the MLP; ``fn(theta) -> (preds, upd, losses, jac)``
  takes the parameters as flat (shared, specific) vectors (see :func:`_flatten`); one jit per
  strategy, shared by the gradient test and the combiner grid."""
  if name not in _MODELS:
    model, tasks, v, x, y = build(name, mlp())
    params0 = v["params"]
    mask = model.shared_mask(params0)

    @jit
    def fn(theta):
      p = _unflatten(theta, params0, mask)
      preds, upd = model.apply(dict(v, params=p), x, train=True)
      losses = jnp.stack([t.loss(preds[t.name], y[t.name]) for t in tasks])
      jac = jax.jacrev(lambda q: task_losses(model, tasks, v, q, x, y))(p)
      rows = lambda want: jax.vmap(lambda g: _flatten(g, mask, want))(jac)
      return preds, upd, losses, {"shared": rows(True), "specific": rows(False)}

    theta0 = {"shared": _flatten(params0, mask, True), "specific": _flatten(params0, mask, False)}
    _MODELS[name] = (model, tasks, v, x, y, fn, theta0)
  return _MODELS[name]


def task_losses(model, tasks, variables, params, x, y):
  v = dict(variables, params=params)
  preds, _ = model.apply(v, x, train=True)
  return jnp.stack([t.loss(preds[t.name], y[t.name]) for t in tasks])


# ---------------------------------------------------------------------------------------------


CONV = ("hard", "cross_stitch", "mtan", "ple")  # spatial features matter there (compile time)


@pytest.mark.parametrize("backbone_fn,name",
                         [(mlp, n) for n in sharing.names()] + [(tiny_conv, n) for n in CONV],
                         ids=[f"mlp-{n}" for n in sharing.names()] + [f"conv-{n}" for n in CONV])
def test_strategy_runs_and_gradients_follow_the_shared_mask(name, backbone_fn):
  if backbone_fn is mlp:
    model, tasks, variables, x, y, fn, theta0 = compiled(name)
    preds, upd, _, flat = fn(theta0)
    mask = model.shared_mask(variables["params"])
    jac = jax.vmap(lambda s, t: _unflatten({"shared": s, "specific": t}, variables["params"],
                                           mask))(flat["shared"], flat["specific"])
  else:
    model, tasks, variables, x, y = build(name, backbone_fn())

    @jit
    def run(v):
      preds, upd = model.apply(v, x, train=True)
      jac = jax.jacrev(lambda p: task_losses(model, tasks, v, p, x, y))(v["params"])
      return preds, upd, jac

    preds, upd, jac = run(variables)
  assert set(preds) == {"a", "b", "c"}
  assert preds["a"].shape == (6,) and preds["b"].shape == (6,) and preds["c"].shape == (6, 3)
  assert all(np.all(np.isfinite(p)) for p in preds.values())
  if "batch_stats" in variables:
    assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  mask = model.shared_mask(variables["params"])
  for (path, g), m in zip(jax.tree_util.tree_leaves_with_path(jac), jax.tree.leaves(mask)):
    g = np.asarray(g).reshape(3, -1)
    nz = np.abs(g) > 0
    where = jax.tree_util.keystr(path)
    assert nz.any(), f"{name}: no gradient on {where}"
    if m:  # a shared leaf: some entry is moved by two tasks
      assert (nz.sum(0) >= 2).any(), f"{name}: shared leaf {where} gets one task's gradient"
    else:  # a task-specific leaf (or slice of stacked towers) gets one task's gradient
      assert (nz.sum(0) <= 1).all(), f"{name}: task-specific leaf {where} mixes tasks"


def test_hard_shares_no_head_and_independent_shares_nothing():
  model, _, v, _, _ = build("hard", mlp())
  mask = model.shared_mask(v["params"])
  assert not any(jax.tree.leaves({k: m for k, m in mask.items() if k.startswith("head_")}))
  assert all(jax.tree.leaves({k: m for k, m in mask.items() if k.startswith("stage_")}))
  model, _, v, _, _ = build("independent", mlp())
  assert not any(jax.tree.leaves(model.shared_mask(v["params"])))
  model, _, v, _, _ = build("soft", mlp())
  assert not any(jax.tree.leaves(model.shared_mask(v["params"])))


@pytest.mark.parametrize("backbone_fn", [mlp, tiny_conv], ids=["mlp", "conv"])
def test_cross_stitch_at_identity_equals_independent_towers(backbone_fn):
  b = backbone_fn()
  ind, tasks, vi, x, _ = build("independent", b)
  cs = sharing.get("cross_stitch", b, tasks, init="identity")
  vc = jit(cs.init)(_key(1), x)
  stitches = {k: v for k, v in vc["params"].items() if k.startswith("stitch_")}
  assert stitches and all(np.array_equal(s, np.eye(3)) for s in stitches.values())
  vc = dict(vc, params=dict(vi["params"], **stitches), batch_stats=vi["batch_stats"])
  both = jit(lambda vi, vc: [(ind.apply(vi, x, train=train)[0], cs.apply(vc, x, train=train)[0])
                             for train in (False, True)])  # eval and train mode: one program
  for pi, pc in both(vi, vc):
    for t in pi:
      np.testing.assert_allclose(pc[t], pi[t], rtol=1e-5, atol=1e-6)
  # Misra's initialisation mixes the towers: convex rows, 0.9 on the diagonal.
  a = towers.stitch_init(3, "misra", 0.9)
  np.testing.assert_allclose(np.sum(a, 1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.diag(a), 0.9)


def test_sparse_with_all_ones_masks_equals_hard_sharing():
  b = mlp()
  hard, tasks, vh, x, _ = build("hard", b)
  sp = sharing.get("sparse", b, tasks)
  vs = jit(sp.init)(_key(3), x)
  assert all(np.all(m) for m in jax.tree.leaves(vs[S.MASKS]))
  vs = dict(vs, params=vh["params"],
            batch_stats=jax.tree.map(lambda a: jnp.broadcast_to(a, (3,) + a.shape),
                                     vh["batch_stats"]))
  both = jit(lambda vh, vs: [(hard.apply(vh, x, train=train), sp.apply(vs, x, train=train))
                             for train in (False, True)])  # eval and train mode: one program
  for (ph, uh), (ps, us) in both(vh, vs):
    for t in ph:
      np.testing.assert_allclose(ps[t], ph[t], rtol=1e-5, atol=1e-6)
  for a, c in zip(jax.tree.leaves(uh), jax.tree.leaves(us)):  # per-task stats agree with hard's
    np.testing.assert_allclose(c, np.broadcast_to(a, c.shape), rtol=1e-5, atol=1e-6)


def test_sparse_masks_act_per_task():
  b = mlp(batch_norm=False)
  sp, tasks, v, x, y = build("sparse", b)
  masks = jax.tree.map(np.array, v[S.MASKS])
  masks["stage_0"]["Dense_0"]["kernel"][1] = False  # task b's first layer: all pruned
  v2 = S.set_masks(v, masks)

  @jit
  def run(v, v2):
    jac = jax.jacrev(lambda p: task_losses(sp, tasks, v2, p, x, y))(v2["params"])
    return sp.apply(v, x)[0], sp.apply(v2, x)[0], jac

  p1, p2, jac = run(v, v2)
  np.testing.assert_allclose(p2["a"], p1["a"])
  np.testing.assert_allclose(p2["c"], p1["c"])
  assert not np.allclose(p2["b"], p1["b"])
  assert np.all(np.asarray(jac["stage_0"]["Dense_0"]["kernel"][1]) == 0)
  with pytest.raises(ValueError, match="tree of the stage parameters"):
    S.set_masks(v, {"stage_0": masks["stage_0"]})


def test_find_masks_prunes_smallest_weights_from_the_common_init():
  b = mlp(batch_norm=False)
  sp, tasks, v, x, y = build("sparse", b)
  seen = []

  def train_fn(params, t, num_steps):
    seen.append((t, num_steps))
    # "Training" moves task t's weights by a fixed task-dependent pattern.
    return jax.tree.map(lambda p: p + 0.1 * (t + 1) * jnp.sin(jnp.arange(p.size) + t)
                        .reshape(p.shape), params)

  masks = S.find_masks(sp, v, train_fn, num_steps=7, prune_rate=0.5, rounds=2)
  assert seen == [(0, 7), (0, 7), (1, 7), (1, 7), (2, 7), (2, 7)]
  k = masks["stage_0"]["Dense_0"]["kernel"]
  assert k.shape == (3, 4, 6) and k.dtype == bool
  assert int(k[0].sum()) == 6  # 24 -> 12 -> 6 kept
  assert np.all(masks["stage_0"]["Dense_0"]["bias"])  # biases are not pruned
  # Round 2 of task 0 pruned the smallest alive magnitudes of the trained weights.
  stats = S.mask_overlap(masks)
  np.testing.assert_allclose(stats["density"], (6 + 8) / (24 + 30))  # 30 -> 15 -> 8 kept
  np.testing.assert_allclose(np.diag(stats["overlap"]), 1.0)
  assert 0.0 <= stats["shared_by_all"] <= stats["used"] <= 1.0
  # eval_fn picks the round whose subnetwork scored best (here: the dense first round).
  best = S.find_masks(sp, v, train_fn, num_steps=1, prune_rate=0.5, rounds=2,
                      eval_fn=lambda p, t: 1.0 if seen.__len__() % 2 else 0.0)
  assert jax.tree.structure(best) == jax.tree.structure(masks)
  with pytest.raises(ValueError, match="prune_rate"):
    S.find_masks(sp, v, train_fn, num_steps=1, prune_rate=1.5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1),
       st.sampled_from(["layer", "global"]))
def test_prune_removes_exactly_the_smallest_alive(n, rate, seed, scope):
  rng = np.random.default_rng(seed)
  w = {"a": rng.normal(size=(n, 3)).round(1), "b": rng.normal(size=(2, n)).round(1)}
  mask = {"a": rng.random((n, 3)) > 0.3, "b": rng.random((2, n)) > 0.3}
  pr = {"a": True, "b": True}
  new = S.prune(w, mask, pr, rate, scope)
  groups = [["a"], ["b"]] if scope == "layer" else [["a", "b"]]
  for g in groups:
    alive = np.concatenate([np.abs(w[k])[mask[k]] for k in g])
    kept = np.concatenate([np.abs(w[k])[new[k]] for k in g])
    removed = np.concatenate([np.abs(w[k])[mask[k] & ~new[k]] for k in g])
    assert all(np.all(new[k] <= mask[k]) for k in g)  # never revives
    assert removed.size == int(np.floor(rate * alive.size))
    if removed.size and kept.size:
      assert removed.max() <= kept.min()


def test_parameter_counts():
  b = mlp()
  x = b.sample_input()
  binary = [T.binary_task(n) for n in "abc"]
  count = {n: sharing.get(n, b, binary, **OPTIONS.get(n, {})).param_count(x)
           for n in sharing.names()}
  single = sharing.get("hard", b, binary[:1]).param_count(x)
  assert count["independent"] == 3 * single
  assert count["soft"] == count["independent"]
  assert count["hard"] < count["independent"]
  assert count["sparse"] == count["hard"]
  assert count["cross_stitch"] == count["independent"] + 2 * 9  # one 3x3 unit per stage
  assert count["hard"] < count["mtan"]
  model, _, v, _, _ = build("hard", b, binary)
  assert model.num_params(v["params"]) == count["hard"]


def test_soft_penalties():
  model, tasks, v, x, _ = build("soft", mlp())
  p = jax.tree.map(np.asarray, v["params"])
  same = {k: (jax.tree.map(lambda a: np.broadcast_to(a[:1], a.shape), w)
              if k.startswith("tower_") else w) for k, w in p.items()}
  tr = sharing.get("soft", mlp(), tasks, penalty="trace", lam=1.0)
  firsts = jax.tree.leaves({k: w for k, w in p.items() if k.startswith("tower_")})[:2]

  @jit  # every penalty, gradient and trace norm below: one program
  def run(p, same, firsts):
    return (model.regularizer(p), model.regularizer(same), jax.grad(model.regularizer)(p),
            tr.regularizer(same), jax.grad(tr.regularizer)(same),
            [towers.trace_norm({"tower_0": a}) for a in firsts])

  reg_p, reg_same, grad_p, tr_same, tr_grad, norms = run(p, same, firsts)
  assert float(reg_p) > 0
  assert float(reg_same) == pytest.approx(0.0, abs=1e-12)
  # The L2 penalty is lam * sum ||theta_k - mean||^2 and its gradient pulls towards the mean.
  lam = 1e-3
  expect = sum(float(np.sum((a - a.mean(0)) ** 2)) for k, w in p.items()
               if k.startswith("tower_") for a in jax.tree.leaves(w))
  np.testing.assert_allclose(float(reg_p), lam * expect, rtol=1e-5)
  assert not any(jax.tree.leaves(jax.tree.map(lambda a: bool(np.any(a != 0)),
                                              {k: w for k, w in grad_p.items()
                                               if k.startswith("head_")})))
  # Identical towers: rank one, trace norm sqrt(K) ||theta|| per leaf; gradient finite.
  expect = sum(float(np.sqrt(3) * np.linalg.norm(a[0])) for k, w in same.items()
               if k.startswith("tower_") for a in jax.tree.leaves(w))
  np.testing.assert_allclose(float(tr_same), expect, rtol=1e-4)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(tr_grad))
  for a, norm in zip(firsts, norms):
    sv = np.linalg.svd(np.asarray(a).reshape(3, -1), compute_uv=False).sum()
    np.testing.assert_allclose(float(norm), sv, rtol=1e-4)


def test_hierarchical_heads_read_their_depth():
  model, tasks, v, x, y = build("hierarchical", mlp())
  assert model.options["depths"] == (1, 2, 2)
  jac = jit(jax.jacrev(lambda p: task_losses(model, tasks, v, p, x, y)))(v["params"])
  # Task a's head reads stage 0: no gradient from it on stage 1.
  assert all(np.all(np.asarray(g[0]) == 0) for g in jax.tree.leaves(jac["stage_1"]))
  assert any(np.any(np.asarray(g[1]) != 0) for g in jax.tree.leaves(jac["stage_1"]))
  m2 = sharing.get("hierarchical", mlp(), tasks, depths={"a": 1})
  assert m2.options["depths"] == (1, 2, 2)
  with pytest.raises(ValueError, match="in 1..2"):
    sharing.get("hierarchical", mlp(), tasks, depths=[0, 1, 2])
  with pytest.raises(ValueError, match="unknown task"):
    sharing.get("hierarchical", mlp(), tasks, depths={"zz": 1})


@pytest.mark.parametrize("name", ["hard", "hierarchical", "mtan"])
def test_encode_decode_split(name):
  model, tasks, v, x, y = build(name, mlp())
  # The features engine mode through a SplitLoss gives the same update as one backward (ls).
  method = combiners.method("ls", 3)
  state = method.transform().init(v["params"])

  def enc(p):
    return model.encode(dict(v, params=p), x, train=False)

  def dec_loss(p, z):
    preds, _ = model.decode(dict(v, params=p), z, train=False)
    return jnp.stack([t.loss(preds[t.name], y[t.name]) for t in tasks]), None

  split = autodiff.SplitLoss(enc, dec_loss)
  plain = lambda p: (task_losses(model, tasks, dict(v), p, x, y) * 0 + jnp.stack(
      [t.loss(model.apply(dict(v, params=p), x)[0][t.name], y[t.name]) for t in tasks]), None)

  @jit  # the split, its round trip and both engine modes: one program
  def run(v):
    full, _ = model.apply(v, x, train=False)
    z, _ = model.encode(v, x, train=False)
    dec, _ = model.decode(v, z, train=False)
    return (full, dec, autodiff.combine(method, state, split, v["params"], mode="features"),
            autodiff.combine(method, state, plain, v["params"], mode="losses"))

  full, dec, a, b = run(v)
  for t in full:
    np.testing.assert_allclose(dec[t], full[t], rtol=1e-5, atol=1e-6)
  for u, w in zip(jax.tree.leaves(a.update), jax.tree.leaves(b.update)):
    np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-6)


def test_no_split_for_towers_and_clear_errors():
  model, *_ = build("independent", mlp())
  with pytest.raises(ValueError, match="no single shared representation"):
    model.encode({}, None)
  with pytest.raises(ValueError, match=r"unknown sharing strategy 'hrad' \(did you mean 'hard'"):
    sharing.get("hrad", mlp(), three_tasks())
  with pytest.raises(ValueError, match="valid: init, after, self_weight|valid: after"):
    sharing.get("cross_stitch", mlp(), three_tasks(), alpha=1)
  with pytest.raises(ValueError, match="penalty"):
    sharing.get("soft", mlp(), three_tasks(), penalty="l3")
  with pytest.raises(ValueError, match="unique"):
    sharing.get("hard", mlp(), [T.binary_task("a"), T.binary_task("a")])
  with pytest.raises(ValueError, match="unknown backbone"):
    models.get("resnet1", width=1)


def test_mixture_gates_are_softmax_over_experts():
  model, tasks, v, x, _ = build("mmoe", mlp(batch_norm=False))
  assert v["params"]["expert_0"]["Dense_0"]["kernel"].shape[0] == 4  # four stacked experts
  # Equal gates (zero gate weights) give the mean of the experts.
  p = dict(v["params"])
  for k in range(3):
    p[f"gate_{k}"] = jax.tree.map(jnp.zeros_like, p[f"gate_{k}"])
  preds, _ = jit(lambda p: model.apply(dict(v, params=p), x))(p)
  feats = jnp.broadcast_to(x, (4,) + x.shape)
  for i in range(2):
    w = p[f"expert_{i}"]["Dense_0"]
    feats = jax.nn.relu(jnp.einsum("ebi,eio->ebo", feats, w["kernel"]) + w["bias"][:, None])
  head = p["head_b"]["Dense_0"]
  expect = (feats.mean(0) @ head["kernel"] + head["bias"])[:, 0]
  np.testing.assert_allclose(preds["b"], expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every strategy trains with every combiner through the same code path (issue 3, "done when").


PAD = 2048  # every strategy's shared / task-specific parameters, flattened and zero-padded


def _flatten(tree, mask, want):
  parts = [jnp.ravel(a) for a, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m == want]
  flat = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
  assert flat.shape[-1] <= PAD
  return jnp.pad(flat, (0, PAD - flat.shape[-1]))


def _unflatten(theta, like, mask):
  out, offset = [], {True: 0, False: 0}
  for a, m in zip(jax.tree.leaves(like), jax.tree.leaves(mask)):
    vec = theta["shared" if m else "specific"]
    out.append(vec[offset[m]:offset[m] + a.size].reshape(a.shape))
    offset[m] += a.size
  return jax.tree.unflatten(jax.tree.structure(like), out)


_STEPS = {}


def _combiner_step(cname):
  """One jitted ``autodiff.combine`` + Adam step per combiner, shared by all strategies.

  The strategies' parameters enter as two zero-padded flat vectors (shared, task-specific) and the
  loss function is the first-order expansion of the model's true task losses at the current
  point, whose value and Jacobian there are exactly the model's: every engine mode therefore gives
  the update it gives on the model itself, while the combiner is compiled once (not once per
  strategy). The model's losses and Jacobian are computed by one jit per strategy.
  """
  if cname not in _STEPS:
    method = combiners.method(cname, 3)
    tx = optax.adam(1e-2)
    mask = {"shared": True, "specific": False}

    @jit
    def step(theta, cstate, ostate, losses, jac):
      def loss_fn(t):
        lin = sum(jac[k] @ (t[k] - theta[k]) for k in ("shared", "specific"))
        return losses + lin, None

      out = autodiff.combine(method, cstate, loss_fn, theta, shared_mask=mask)
      upd, ostate = tx.update(out.update, ostate, theta)
      return optax.apply_updates(theta, upd), out.state, ostate, out.losses

    init = jit(lambda theta: (method.transform(mask).init(theta), tx.init(theta)))
    _STEPS[cname] = (method, step, init)
  return _STEPS[cname]


def test_every_strategy_trains_with_every_combiner():
  failures = []
  for sname in sharing.names():
    model, tasks, variables, x, y, fn, theta0 = compiled(sname)
    params0 = variables["params"]
    mask = model.shared_mask(params0)
    any_shared = any(jax.tree.leaves(mask))
    # The real (unpadded) length of each flat vector: what _unflatten reads back.
    sizes = {k: sum(a.size for a, m in zip(jax.tree.leaves(params0), jax.tree.leaves(mask))
                    if m == (k == "shared")) for k in ("shared", "specific")}

    def loss_fn(p):
      preds, _ = model.apply(dict(variables, params=p), x, train=True)
      return jnp.stack([t.loss(preds[t.name], y[t.name]) for t in tasks]), None

    for cname in combiners.names():
      method, step, init = _combiner_step(cname)
      if method.needs != combiners.LOSSES and not any_shared:
        # Nothing shared (independent towers, soft sharing): a Gramian over shared parameters
        # does not exist; the engine says so on the real model (the trainer refuses such configs).
        # (Jacobian aggregators may instead treat the empty shared set as a no-op.)
        try:
          jax.eval_shape(lambda p: autodiff.combine(
              method, method.transform(mask).init(p), loss_fn, p, shared_mask=mask), params0)
        except ValueError as e:
          assert "shared" in str(e), (sname, cname, e)
        continue
      theta, (cstate, ostate) = theta0, init(theta0)
      for _ in range(2):
        _, _, losses, jac = fn(theta)
        theta, cstate, ostate, seen = step(theta, cstate, ostate, losses, jac)
        np.testing.assert_allclose(seen, losses, rtol=1e-6)
      # Checked on the flat vectors' unpadded parts, i.e. on every parameter (host-side numpy).
      new = {k: np.asarray(theta[k])[:n] for k, n in sizes.items()}
      old = {k: np.asarray(theta0[k])[:n] for k, n in sizes.items()}
      moved = any(bool(np.any(new[k] != old[k])) for k in sizes)
      finite = all(bool(np.all(np.isfinite(new[k]))) for k in sizes)
      if not (moved and finite):
        failures.append(f"{sname} x {cname}: moved={moved} finite={finite}")
  assert not failures, failures
