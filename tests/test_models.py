"""Backbones of mtl_jax.models: lenet, resnet18, mpnn, segnet, dilated_resnet, transformer."""

import functools

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mtl_jax import models
from mtl_jax.models import dilated_resnet, lenet, mpnn, segnet, transformer


class Chain(nn.Module):
  """Runs a backbone's stages in order (what hard sharing does)."""
  stages: tuple

  @nn.compact
  def __call__(self, x, train: bool):
    for make in self.stages:
      x = make()(x, train)
    return x


# The cost of these tests is XLA compilation, not running the tiny programs: compile without LLVM's
# optimisation passes (same semantics, ~40% less compile time) and gather each test's computations
# into one jitted program rather than op-by-op dispatch.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _key(seed=0):
  # The 'rbg' PRNG compiles initialisers ~3x faster than threefry on the CPU (tests stay quick).
  return jax.random.key(seed, impl="rbg")


def _rand_like(x, seed=1):
  rng = np.random.default_rng(seed)
  return rng.normal(size=x.shape).astype(np.float32) if x.dtype == np.float32 else x


TINY = {
    "lenet": (dict(width=0.5, image_size=28), (2, 25)),
    "resnet18": (dict(width=1 / 16, blocks=(1, 1, 1, 1), image_size=16), (2, 32)),
    "mpnn": (dict(width=1 / 8, num_passes=2, processing_steps=2), (2, 8)),
    "segnet": (dict(width=1 / 16, levels=2, image_size=(8, 16)), (2, 8, 16, 4)),
    "dilated_resnet": (dict(width=1 / 16, blocks=(1, 1, 1, 1), image_size=16), (2, 2, 2, 128)),
    "transformer": (dict(width=1 / 16, num_layers=2, num_heads=2, vocab_size=50), (2, 6, 16)),
}


def _sample(bb):
  x = bb.sample_input()
  if isinstance(x, dict):  # graph / text: randomise the float features only
    return {k: _rand_like(v) for k, v in x.items()}
  return _rand_like(x)


@pytest.mark.parametrize("name", sorted(TINY))
def test_backbone_builds_trains_and_evaluates(name):
  opts, out_shape = TINY[name]
  bb = models.get(name, **opts)
  assert len(bb.widths) == len(bb.stages)
  model = Chain(bb.stages)
  x = _sample(bb)
  proj = np.random.default_rng(3).normal(size=out_shape).astype(np.float32)

  @jit  # init, one train step and one eval pass: a single compilation
  def run(x):
    variables = model.init(_key(), x, train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})

    def loss_fn(p):
      out, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.sum(out * proj), (out, upd.get("batch_stats", {}))
    (_, (out, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    eval_out = model.apply({"params": params, "batch_stats": new_stats}, x, train=False)
    return stats, out, new_stats, grads, eval_out

  stats, out, new_stats, grads, eval_out = run(x)
  assert out.shape == out_shape and bool(np.all(np.isfinite(out)))
  assert eval_out.shape == out_shape and bool(np.all(np.isfinite(eval_out)))

  # Batch-norm statistics move in train mode (and exist exactly for the BN backbones).
  has_bn = name not in ("lenet", "mpnn", "transformer")
  assert bool(stats) == has_bn
  if has_bn:
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), stats, new_stats)
    assert all(jax.tree.leaves(moved))

  # Every gradient is finite and every parameter gets one.
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert all(bool(np.all(np.isfinite(g))) for _, g in flat)
  dead = [jax.tree_util.keystr(p) for p, g in flat if float(np.max(np.abs(g))) == 0.0]
  assert not dead, dead


def test_registry_lists_the_backbones_and_rejects_bad_options():
  assert {"lenet", "resnet18", "mpnn", "segnet", "dilated_resnet", "transformer"} <= set(
      models.names())
  with pytest.raises(ValueError, match="valid"):
    models.get("segnet", depth=3)
  with pytest.raises(ValueError, match="tokens, pooled, dict"):
    transformer.transformer(output="cls")
  with pytest.raises(ValueError, match="width > 0"):
    lenet.lenet(width=-1)
  with pytest.raises(ValueError, match="levels"):
    segnet.segnet(levels=6)


def _stagewise_shapes(bb, x):
  shapes = []
  for make in bb.stages:
    mod = make()
    v = jax.eval_shape(lambda x: mod.init(jax.random.PRNGKey(0), x, train=False), x)
    x = jax.eval_shape(lambda v, x: mod.apply(v, x, train=False), v, x)
    shapes.append(x)
  return shapes


def test_full_size_shapes_widths_and_parameter_counts():
  # ResNet-18 / ResNet-50 trunks without their classifier have the well-known sizes.
  counts = {}
  for name in ("resnet18", "dilated_resnet", "lenet"):
    bb = models.get(name)
    x = bb.sample_input()
    counts[name] = 0
    for make in bb.stages:
      mod = make()
      v = jax.eval_shape(lambda x: mod.init(jax.random.PRNGKey(0), x, train=False), x)
      counts[name] += sum(int(np.prod(p.shape)) for p in jax.tree.leaves(v["params"]))
      x = jax.eval_shape(lambda v, x: mod.apply(v, x, train=False), v, x)
  assert counts["resnet18"] == 11_173_962 - (512 * 10 + 10)  # torchvision-style CIFAR ResNet-18
  assert counts["dilated_resnet"] == 25_557_032 - (2048 * 1000 + 1000)  # torchvision ResNet-50
  # LeNet on 36x36: conv 1->10 (260), conv 10->20 (5020), dense 720->50 (36050).
  assert counts["lenet"] == 260 + 5020 + 36050

  # SegNet: encoder halves 5 times, decoder restores; widths match the feature channels.
  bb = segnet.segnet(width=1 / 16, image_size=(32, 64))
  shapes = _stagewise_shapes(bb, bb.sample_input())
  feats = [s.features if isinstance(s, segnet.SegNetState) else s for s in shapes]
  assert [f.shape[-1] for f in feats] == list(bb.widths)
  assert [f.shape[1:3] for f in feats] == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2), (2, 4),
                                           (4, 8), (8, 16), (16, 32), (32, 64)]
  # Dilated ResNet: output stride 8, widths = 256, 512, 1024, 2048 x width.
  bb = dilated_resnet.dilated_resnet(width=1 / 16, blocks=(1, 1, 1, 1), image_size=(24, 40))
  shapes = _stagewise_shapes(bb, bb.sample_input())
  assert [s.shape for s in shapes] == [(2, 6, 10, 16), (2, 3, 5, 32), (2, 3, 5, 64), (2, 3, 5, 128)]
  assert bb.widths == (16, 32, 64, 128)


def test_segnet_rejects_sizes_it_cannot_pool():
  bb = segnet.segnet(width=1 / 16, levels=2)
  with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
    jax.eval_shape(lambda x: Chain(bb.stages).init(_key(), x, train=False),
                   np.zeros((1, 6, 6, 3), np.float32))


_POOL = jit(segnet.max_pool_with_mask)
_UNPOOL = jit(segnet.max_unpool)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, (2, 4, 6, 3), elements=st.integers(-3, 3).map(float)))
def test_max_pool_with_mask_matches_pytorch_semantics(x):
  pooled, mask = _POOL(x)
  win = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 2, 3, 3, 4)
  np.testing.assert_array_equal(pooled, win.max(-1))
  # Exactly one position per window, the first maximum in row-major order (PyTorch's index).
  m = np.asarray(mask).transpose(0, 1, 3, 5, 2, 4).reshape(2, 2, 3, 3, 4)
  assert (m.sum(-1) == 1).all()
  np.testing.assert_array_equal(m.argmax(-1), win.argmax(-1))
  # Unpooling puts each maximum back where it was, zeros elsewhere.
  up = np.asarray(_UNPOOL(pooled, mask))
  np.testing.assert_array_equal(up, np.where(m == 1, win, 0.0).reshape(2, 2, 3, 3, 2, 2).transpose(
      0, 1, 4, 2, 5, 3).reshape(x.shape))
  refill = np.where(np.asarray(mask).reshape(x.shape), up, -np.inf)  # the zeros are not maxima
  np.testing.assert_array_equal(_POOL(refill)[0], pooled)


def test_dense_heads():
  rng = np.random.default_rng(0)
  z1 = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  z2 = rng.normal(size=(2, 3, 5, 16)).astype(np.float32)
  conv = segnet.conv_head(3, normalize=True)
  head = dilated_resnet.deeplab_head(13, features=8)

  @jit  # both heads: one program
  def run(z1, z2):
    y1 = conv.apply(conv.init(_key(1), z1), z1)
    v = head.init(_key(1), z2)
    y, upd = head.apply(v, z2, train=True, mutable=["batch_stats"], rngs={"dropout": _key(2)})
    return y1, y, v["batch_stats"], upd["batch_stats"]
  y1, y, stats, new_stats = run(z1, z2)
  assert y1.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(np.linalg.norm(y1, axis=-1), 1.0, rtol=1e-5)
  assert y.shape == (2, 24, 40, 13) and bool(np.all(np.isfinite(y)))
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), stats, new_stats)))
  with pytest.raises(ValueError, match="out_channels"):
    segnet.conv_head(0)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.integers(2, 5), st.integers(2, 12), st.integers(2, 12))
def test_align_corners_resize_reproduces_linear_functions(h, w, ho, wo):
  a, b, c = 0.7, -1.3, 0.25
  grid = lambda n, m: (np.arange(n)[:, None] / max(n - 1, 1), np.arange(m)[None, :] / max(m - 1, 1))
  yi, xi = grid(h, w)
  x = (a * yi + b * xi + c)[None, :, :, None].astype(np.float32)
  y = dilated_resnet.resize_bilinear_align_corners(x, (ho, wo))  # numpy in, numpy out
  yo, xo = grid(ho, wo)
  np.testing.assert_allclose(y[0, :, :, 0], a * yo + b * xo + c, atol=1e-5)
  # Corners are kept exactly (align_corners=True).
  np.testing.assert_allclose(y[0, [0, 0, -1, -1], [0, -1, 0, -1], 0],
                             x[0, [0, 0, -1, -1], [0, -1, 0, -1], 0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MPNN: the graph-batch format, permutation and padding invariance.

def _molecule(rng, n, extra_bonds=1):
  bonds = [(i, i + 1) for i in range(n - 1)]
  bonds += [tuple(sorted(rng.choice(n, 2, replace=False))) for _ in range(extra_bonds)]
  snd = [a for a, b in bonds] + [b for a, b in bonds]
  rcv = [b for a, b in bonds] + [a for a, b in bonds]
  return {"nodes": rng.normal(size=(n, 11)).astype(np.float32),
          "edges": rng.normal(size=(len(snd), 5)).astype(np.float32),
          "senders": np.array(snd), "receivers": np.array(rcv)}


def test_pad_graphs_format():
  rng = np.random.default_rng(0)
  g1, g2 = _molecule(rng, 3, 0), _molecule(rng, 2, 0)
  b = mpnn.pad_graphs([g1, g2], max_nodes=7, max_edges=9, max_graphs=3)
  assert set(b) == set(mpnn.GRAPH_KEYS)
  assert b["nodes"].shape == (7, 11) and b["edges"].shape == (9, 5)
  np.testing.assert_array_equal(b["node_graph"], [0, 0, 0, 1, 1, 3, 3])
  np.testing.assert_array_equal(b["node_mask"], [1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(b["graph_mask"], [1, 1, 0])
  assert b["edge_mask"].sum() == 6 and not b["edge_mask"][6:].any()
  np.testing.assert_array_equal(b["senders"][:6], [0, 1, 1, 2, 3, 4])  # g2 shifted by 3 nodes
  np.testing.assert_array_equal(b["receivers"][:6], [1, 2, 0, 1, 4, 3])
  np.testing.assert_array_equal(b["nodes"][3:5], g2["nodes"])
  assert not b["nodes"][5:].any()
  with pytest.raises(ValueError, match="exceed"):
    mpnn.pad_graphs([g1, g2], max_nodes=4, max_edges=9)
  with pytest.raises(ValueError, match="max_graphs"):
    mpnn.pad_graphs([g1, g2], max_nodes=7, max_edges=9, max_graphs=1)
  with pytest.raises(ValueError, match="outside"):
    mpnn.pad_graphs([dict(g1, senders=np.array([0, 5, 1, 2]))], max_nodes=7, max_edges=9)


def _mpnn_apply():
  bb = mpnn.mpnn(width=1 / 8, edge_hidden=16)
  model = Chain(bb.stages)
  rng = np.random.default_rng(0)
  mols = [_molecule(rng, 4), _molecule(rng, 3), _molecule(rng, 5, 2)]
  batch = mpnn.pad_graphs(mols, 12, 32)
  variables = jit(lambda b: model.init(_key(), b, train=False))(batch)
  apply = jit(lambda b: model.apply(variables, b, train=False))  # retraced per padded size
  return mols, apply


def test_mpnn_is_invariant_to_node_order_edge_order_and_padding():
  mols, apply = _mpnn_apply()
  ref = np.asarray(apply(mpnn.pad_graphs(mols, 12, 32)))
  assert ref.shape == (3, 8) and np.abs(ref).max() > 0

  # Relabel the atoms of every molecule and shuffle its edge list.
  rng = np.random.default_rng(1)
  permuted = []
  for m in mols:
    n, e = len(m["nodes"]), len(m["senders"])
    perm, eperm = rng.permutation(n), rng.permutation(e)
    new_id = np.argsort(perm)  # old node i becomes new node new_id[i]
    permuted.append({"nodes": m["nodes"][perm], "edges": m["edges"][eperm],
                     "senders": new_id[m["senders"]][eperm], "receivers": new_id[m["receivers"]][eperm]})
  np.testing.assert_allclose(apply(mpnn.pad_graphs(permuted, 12, 32)), ref, atol=1e-5)

  # Interleave the nodes of different molecules in the batch (a batch-level permutation).
  b = mpnn.pad_graphs(mols, 12, 32)
  perm = np.random.default_rng(2).permutation(12)
  inv = np.argsort(perm)
  shuffled = dict(b, nodes=b["nodes"][perm], node_graph=b["node_graph"][perm],
                  node_mask=b["node_mask"][perm], senders=inv[b["senders"]].astype(np.int32),
                  receivers=inv[b["receivers"]].astype(np.int32))
  np.testing.assert_allclose(apply(shuffled), ref, atol=1e-5)

  # More padding nodes, edges and graph slots leave the real graphs' outputs unchanged and the
  # padding graphs at zero (same parameters).
  big = np.asarray(apply(mpnn.pad_graphs(mols, 20, 40, max_graphs=5)))
  np.testing.assert_allclose(big[:3], ref, atol=1e-5)
  assert not big[3:].any()


def test_mpnn_rejects_a_plain_array():
  bb = mpnn.mpnn(width=1 / 8)
  with pytest.raises(ValueError, match="pad_graphs"):
    bb.stages[0]().init(jax.random.PRNGKey(0), np.zeros((3, 11), np.float32), train=False)


# ---------------------------------------------------------------------------------------------
# Transformer: padding invariance, pooling, heads on intermediate stages.

def _tokens(t):
  tokens = np.zeros((2, t), np.int32)
  tokens[0, :5] = [4, 9, 2, 7, 3]
  tokens[1, :2] = [8, 1]
  return {"tokens": tokens, "mask": tokens != 0}


def test_transformer_is_invariant_to_padding_length():
  opts = dict(width=1 / 16, num_layers=2, num_heads=2, vocab_size=20, max_len=16)
  base = Chain(transformer.transformer(**opts).stages)  # the parameters are the same for every output
  outputs = ("tokens", "pooled", "dict")
  chains = [Chain(transformer.transformer(output=output, **opts).stages) for output in outputs]

  @jit  # init and every output at both padding lengths: one program
  def run(short, long):
    v = base.init(_key(), short, train=False)
    return [(m.apply(v, short, train=False), m.apply(v, long, train=False)) for m in chains]

  for output, (short, long) in zip(outputs, run(_tokens(6), _tokens(11))):
    if output == "tokens":
      np.testing.assert_allclose(long[:, :6], short, atol=1e-5)
      assert not np.asarray(long[:, 6:]).any() and not np.asarray(short[1, 2:]).any()
    elif output == "pooled":
      assert short.shape == (2, 16)
      np.testing.assert_allclose(long, short, atol=1e-5)
      pooled = short
    else:
      np.testing.assert_allclose(long["features"][0, :5], short["features"][0, :5], atol=1e-5)
      np.testing.assert_allclose(pooled[1], short["features"][1, :2].mean(0), atol=1e-5)


def test_transformer_heads_and_dropout():
  bb = transformer.transformer(width=1 / 16, num_layers=2, num_heads=2, vocab_size=20,
                               output="dict", dropout=0.5)
  x = _tokens(6)
  first = bb.stages[0]()
  th, ph = transformer.token_head(5), transformer.pooled_head(3)

  @jit  # the stage, both heads, the padding check and the dropout modes: one program
  def run(x):
    v = first.init(_key(), x, train=False)
    mid = first.apply(v, x, train=False)  # an intermediate stage: the pre-LN residual stream
    tv, pv = th.init(_key(1), mid), ph.init(_key(1), mid)
    junk = dict(mid, features=mid["features"].at[1, 2:].set(100.0))
    return (mid, th.apply(tv, mid), ph.apply(pv, mid), ph.apply(pv, junk),
            first.apply(v, x, train=True),
            first.apply(v, x, train=True, rngs={"dropout": _key(5)}), pv)

  mid, tok, pooled, pooled_junk, a, b, pv = run(x)
  assert set(mid) == {"features", "mask"} and mid["features"].shape == (2, 6, 16)
  assert tok.shape == (2, 6, 5) and pooled.shape == (2, 3)
  # Padding positions do not reach a pooled head.
  np.testing.assert_allclose(pooled_junk, pooled, atol=1e-5)
  with pytest.raises(ValueError, match="mask"):
    jax.eval_shape(lambda f: ph.apply(pv, f), mid["features"])
  # Dropout acts only in train mode with a 'dropout' RNG.
  np.testing.assert_allclose(a["features"], mid["features"], atol=1e-6)
  assert not np.allclose(b["features"], mid["features"])


def test_lenet_dropout_and_head():
  bb = lenet.lenet(image_size=28)
  model = Chain(bb.stages)
  x = np.random.default_rng(0).normal(size=(2, 28, 28)).astype(np.float32)  # [B, H, W] accepted
  head = lenet.lenet_head(10)

  @jit  # eval, train without and with a dropout RNG, and the head: one program
  def run(x):
    v = model.init(_key(), x, train=False)
    z = model.apply(v, x, train=False)
    return (z, model.apply(v, x, train=True), model.apply(v, x, train=True, rngs={"dropout": _key(1)}),
            head.apply(head.init(_key(2), z), z))

  z, zt, zd, logits = run(x)
  assert z.shape == (2, 50)
  np.testing.assert_allclose(zt, z, atol=1e-6)
  assert not np.allclose(zd, z)
  assert logits.shape == (2, 10)
