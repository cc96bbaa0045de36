"""The QM9 message-passing network (MPNN) and the padded graph-batch format.

Model: Gilmer et al., "Neural Message Passing for Quantum Chemistry", ICML 2017, in the form of the
PyTorch Geometric example ``examples/qm9_nn_conv.py`` that the Nash-MTL paper (Navon et al. 2022,
official code ``AvivNavon/nash-mtl``, ``experiments/quantum_chemistry/models.py``) and FAMO use for
the 11 QM9 tasks:

  x = ReLU(Linear(F_node -> width)(nodes));  h = x
  3 times (the same weights each time):
    m = ReLU(NNConv(x))      NNConv: x_i W_root + b + mean_{j -> i} x_j Theta(e_ji),
                             Theta = Linear(F_edge -> 128) -> ReLU -> Linear(128 -> width * width)
    x = h = GRU(m, h)
  g = Set2Set(x, 3 processing steps)  -> [G, 2 width]
  g = ReLU(Linear(2 width -> width)(g))

and the tasks' outputs are linear heads on ``g`` (Nash-MTL: one ``Linear(width -> 11)``, which is the
same as 11 one-unit heads). Stages: (embedding + message passing) -> graph batch whose ``nodes`` are
the node states ``[N_pad, width]``; (Set2Set readout + dense) -> ``[G_pad, width]``.

Graph batch format (a dict of arrays; built from per-molecule numpy arrays by :func:`pad_graphs`,
produced by the QM9 data pipeline, consumed by this module):

=============  ===================  ==============================================================
key            shape / dtype        meaning
=============  ===================  ==============================================================
``nodes``      [N_pad, F_node] f32  node features (QM9 as PyG: 11 = one-hot H,C,N,O,F; atomic
                                    number; aromatic; sp, sp2, sp3; number of H); zeros at padding
``edges``      [E_pad, F_edge] f32  edge features (QM9: one-hot of the 4 bond types, optionally the
                                    distance as a 5th column); zeros at padding
``senders``    [E_pad] int32        source node (batch-global index) of each *directed* edge;
                                    messages flow sender -> receiver; an undirected bond is two
                                    edges; padding edges point to node 0 and are masked
``receivers``  [E_pad] int32        target node of each directed edge
``node_graph`` [N_pad] int32        graph id in [0, G_pad) of each node; padding nodes hold G_pad
                                    (a dummy graph that every reduction drops)
``node_mask``  [N_pad] bool         True for real nodes
``edge_mask``  [E_pad] bool         True for real edges
``graph_mask`` [G_pad] bool         True for real graphs (a batch may hold fewer than G_pad)
=============  ===================  ==============================================================

The number of graphs ``G_pad`` is static: it is ``graph_mask.shape[0]``. Nodes of one graph need not
be contiguous. Outputs for padding graphs are zero and must be masked out of losses with
``graph_mask``. All reductions are segment sums / maxima, so the output does not depend on the order
of nodes or edges nor on the amount of padding (tested).

Deviations from PyG / Nash-MTL: flax default initialisation (LeCun normal kernels, zero biases)
instead of PyTorch's uniform fan-in defaults, except the Set2Set LSTM biases, which keep PyTorch's
U(-1/sqrt(width), 1/sqrt(width)) (with zero biases the first processing step from the zero state is
exactly zero); NNConv's root term is ``Dense(use_bias=True)`` (PyG: a bias-free root
linear plus a separate bias, the same function); nodes without incoming edges receive a zero mean
message (as PyG). PyG's QM9 example also turns each molecule into a complete graph
(``T.Complete()``) and appends the distance (``T.Distance(norm=False)``): that is the data pipeline's
choice, the model takes whatever edges it is given.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import layers
from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import register

GRAPH_KEYS = ("nodes", "edges", "senders", "receivers", "node_graph", "node_mask", "edge_mask",
              "graph_mask")


def pad_graphs(graphs: Sequence[dict[str, Any]], max_nodes: int, max_edges: int,
               max_graphs: int | None = None) -> dict[str, np.ndarray]:
  """Packs molecules into one padded graph batch (the format of the module docstring).

  Each graph is a dict with ``nodes`` [n, F_node], ``edges`` [e, F_edge] and ``senders``,
  ``receivers`` [e] (indices local to the graph, in [0, n)). ``max_nodes`` / ``max_edges`` are the
  capacities of the whole batch, ``max_graphs`` the number of graph slots (default: ``len(graphs)``).
  """
  graphs = list(graphs)
  g_pad = len(graphs) if max_graphs is None else int(max_graphs)
  if not graphs:
    raise ValueError("pad_graphs needs at least one graph")
  if len(graphs) > g_pad:
    raise ValueError(f"pad_graphs: {len(graphs)} graphs do not fit in max_graphs={g_pad}")
  for key in ("nodes", "edges", "senders", "receivers"):
    if key not in graphs[0]:
      raise ValueError(f"pad_graphs: each graph needs keys nodes, edges, senders, receivers; "
                       f"missing {key!r}")
  n_tot = sum(len(g["nodes"]) for g in graphs)
  e_tot = sum(len(g["senders"]) for g in graphs)
  if n_tot > max_nodes or e_tot > max_edges:
    raise ValueError(f"pad_graphs: {n_tot} nodes / {e_tot} edges exceed max_nodes={max_nodes} / "
                     f"max_edges={max_edges}")
  f_node = np.asarray(graphs[0]["nodes"]).shape[-1]
  f_edge = np.asarray(graphs[0]["edges"]).reshape(len(graphs[0]["senders"]), -1).shape[-1]
  out = {
      "nodes": np.zeros((max_nodes, f_node), np.float32),
      "edges": np.zeros((max_edges, f_edge), np.float32),
      "senders": np.zeros((max_edges,), np.int32),
      "receivers": np.zeros((max_edges,), np.int32),
      "node_graph": np.full((max_nodes,), g_pad, np.int32),
      "node_mask": np.zeros((max_nodes,), bool),
      "edge_mask": np.zeros((max_edges,), bool),
      "graph_mask": np.zeros((g_pad,), bool),
  }
  n0 = e0 = 0
  for gid, g in enumerate(graphs):
    nodes = np.asarray(g["nodes"], np.float32)
    snd = np.asarray(g["senders"], np.int64)
    rcv = np.asarray(g["receivers"], np.int64)
    n, e = len(nodes), len(snd)
    if len(rcv) != e or (e and (min(snd.min(), rcv.min()) < 0 or max(snd.max(), rcv.max()) >= n)):
      raise ValueError(f"pad_graphs: graph {gid} has senders/receivers of unequal length or "
                       f"outside [0, {n})")
    out["nodes"][n0:n0 + n] = nodes
    out["edges"][e0:e0 + e] = np.asarray(g["edges"], np.float32).reshape(e, f_edge)
    out["senders"][e0:e0 + e] = snd + n0
    out["receivers"][e0:e0 + e] = rcv + n0
    out["node_graph"][n0:n0 + n] = gid
    out["node_mask"][n0:n0 + n] = True
    out["edge_mask"][e0:e0 + e] = True
    out["graph_mask"][gid] = True
    n0, e0 = n0 + n, e0 + e
  return out


def _check_graph(g):
  if not isinstance(g, dict) or any(k not in g for k in GRAPH_KEYS):
    raise ValueError(f"mpnn expects a graph batch dict with keys {', '.join(GRAPH_KEYS)} "
                     "(see mtl_jax.models.mpnn.pad_graphs)")


class NNConv(nn.Module):
  """Edge-conditioned convolution (Gilmer et al. 2017; PyG ``NNConv(aggr='mean')``).

  ``out_i = x_i W_root + b + mean_{j -> i} x_j Theta(e_ji)`` with the edge network
  ``Theta(e) = Linear(128 -> d * features)(ReLU(Linear(F_edge -> 128)(e)))`` reshaped to
  ``[d, features]``. The per-edge matrices depend on the edges only, so a caller applying the same
  convolution several times (the MPNN's message passes) computes them once with
  :meth:`edge_weights` and passes them as ``theta``: the forward pass builds the ``[E, d, features]``
  tensor once and the backward pass pushes the summed cotangent through the edge network once,
  instead of once per pass (the edge network's backward dominates the cost of per-task gradients).
  """
  features: int
  edge_hidden: int = 128
  in_features: int = 0  # width d of the incoming node states (0: the same as ``features``)

  def setup(self):
    d = self.in_features or self.features
    self.edge_fc1 = layers.Dense(self.edge_hidden)
    self.edge_fc2 = layers.Dense(d * self.features)
    self.root = layers.Dense(self.features)

  def edge_weights(self, edges):
    """``Theta(e)`` for every edge: ``[E, F_edge] -> [E, d, features]``."""
    d = self.in_features or self.features
    hidden = nn.relu(self.edge_fc1(layers.as_float(edges)))
    return self.edge_fc2(hidden).reshape(-1, d, self.features)

  def __call__(self, x, g, theta=None):
    n, d = x.shape
    if d != (self.in_features or self.features):
      raise ValueError(f"NNConv: node states of width {d}, expected in_features="
                       f"{self.in_features or self.features}")
    if theta is None:
      theta = self.edge_weights(g["edges"])
    emask = g["edge_mask"].astype(x.dtype)
    msg = jnp.einsum("ed,edf->ef", x[g["senders"]], theta) * emask[:, None]
    total = jax.ops.segment_sum(msg, g["receivers"], num_segments=n)
    count = jax.ops.segment_sum(emask, g["receivers"], num_segments=n)
    mean = total / jnp.maximum(count, 1.0)[:, None]
    return mean + self.root(x)


class MPNNEncoder(nn.Module):
  """Stage 1: node embedding and ``num_passes`` rounds of NNConv + GRU (weights shared by rounds)."""
  width: int = 64
  num_passes: int = 3
  edge_hidden: int = 128

  @nn.compact
  def __call__(self, g, train: bool):
    del train
    _check_graph(g)
    nodes = layers.as_float(g["nodes"])
    nmask = g["node_mask"].astype(nodes.dtype)[:, None]
    x = nn.relu(layers.Dense(self.width, name="embed")(nodes)) * nmask
    conv = NNConv(self.width, self.edge_hidden, name="conv")
    gru = nn.GRUCell(self.width, name="gru")
    theta = conv.edge_weights(g["edges"])  # once for all passes (the passes share the weights)
    h = x
    for _ in range(self.num_passes):
      m = nn.relu(conv(x, g, theta))
      h, _ = gru(h, m)
      h = h * nmask  # padding nodes stay at zero
      x = h
    return {**g, "nodes": x}


def segment_softmax(logits, segments, num_segments, mask):
  """Softmax of ``logits`` within each segment over the entries where ``mask`` is True."""
  neg = jnp.where(mask, logits, -jnp.inf)
  top = jax.ops.segment_max(neg, segments, num_segments=num_segments)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  ex = jnp.where(mask, jnp.exp(logits - top[segments]), 0.0)
  den = jax.ops.segment_sum(ex, segments, num_segments=num_segments)
  return ex / jnp.where(den > 0, den, 1.0)[segments]


def _symmetric_uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Set2Set(nn.Module):
  """Set2Set readout (Vinyals et al. 2016; PyG ``Set2Set``): ``[N, D]`` nodes -> ``[G, 2D]``."""
  processing_steps: int = 3

  @nn.compact
  def __call__(self, x, node_graph, node_mask, num_graphs: int):
    n, d = x.shape
    # PyTorch's LSTM bias init, U(-1/sqrt(d), 1/sqrt(d)): with flax's zero biases the first step
    # from the zero state would output exactly zero, wasting one processing step.
    lstm = nn.OptimizedLSTMCell(d, bias_init=_symmetric_uniform(1.0 / np.sqrt(d)), name="lstm")
    carry = (jnp.zeros((num_graphs, d), x.dtype), jnp.zeros((num_graphs, d), x.dtype))
    q_star = jnp.zeros((num_graphs, 2 * d), x.dtype)
    seg = num_graphs + 1  # the last segment collects the padding nodes and is dropped
    for _ in range(self.processing_steps):
      carry, q = lstm(carry, q_star)
      q_node = jnp.concatenate([q, jnp.zeros((1, d), q.dtype)])[node_graph]
      att = segment_softmax(jnp.sum(x * q_node, -1), node_graph, seg, node_mask)
      r = jax.ops.segment_sum(att[:, None] * x, node_graph, num_segments=seg)[:num_graphs]
      q_star = jnp.concatenate([q, r], axis=-1)
    return q_star


class MPNNReadout(nn.Module):
  """Stage 2: Set2Set readout and ``ReLU(Linear(2 width -> width))``; ``[G_pad, width]``."""
  width: int = 64
  processing_steps: int = 3

  @nn.compact
  def __call__(self, g, train: bool):
    del train
    _check_graph(g)
    num_graphs = g["graph_mask"].shape[0]
    out = Set2Set(self.processing_steps, name="set2set")(
        g["nodes"], g["node_graph"], g["node_mask"], num_graphs)
    out = nn.relu(layers.Dense(self.width, name="fc")(out))
    return out * g["graph_mask"].astype(out.dtype)[:, None]


def _sample_graphs(node_features: int, edge_features: int) -> dict[str, np.ndarray]:
  """Two tiny molecules (a 3-atom chain and a 2-atom bond) with a little padding."""
  rng = np.random.default_rng(0)

  def mol(n, bonds):
    snd = [a for a, b in bonds] + [b for a, b in bonds]
    rcv = [b for a, b in bonds] + [a for a, b in bonds]
    return {"nodes": rng.random((n, node_features), np.float32),
            "edges": rng.random((len(snd), edge_features), np.float32),
            "senders": np.array(snd), "receivers": np.array(rcv)}

  return pad_graphs([mol(3, [(0, 1), (1, 2)]), mol(2, [(0, 1)])], max_nodes=6, max_edges=8)


@register("mpnn")
def mpnn(width: float = 1.0, num_passes: int = 3, processing_steps: int = 3,
         edge_hidden: int = 128, node_features: int = 11, edge_features: int = 5) -> Backbone:
  """The QM9 MPNN of Nash-MTL / PyG (``width=1``: 64 features, 3 passes, Set2Set with 3 steps).

  ``width`` multiplies the node width (64) and ``edge_hidden`` (128). ``node_features`` /
  ``edge_features`` only shape :attr:`Backbone.sample_input` (the model reads the feature sizes from
  its input).
  """
  if width <= 0 or num_passes < 1 or processing_steps < 1 or edge_hidden < 1:
    raise ValueError(f"mpnn needs width > 0 and positive num_passes, processing_steps, edge_hidden; "
                     f"got {width}, {num_passes}, {processing_steps}, {edge_hidden}")
  edge_hidden = max(1, int(round(edge_hidden * width)))
  width = max(1, int(round(64 * width)))
  return Backbone(
      name="mpnn",
      stages=(lambda: MPNNEncoder(width, num_passes, edge_hidden),
              lambda: MPNNReadout(width, processing_steps)),
      widths=(width, width),
      sample_input=lambda: _sample_graphs(node_features, edge_features),
  )
