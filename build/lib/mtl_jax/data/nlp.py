"""Text benchmarks: CoNLL-2003 token tasks and a multi-input mix of GLUE sentence tasks.

``conll2003`` (Tjong Kim Sang & De Meulder, 2003; tfds ``conll2003``): part-of-speech (47 tags),
chunking (23) and named entities (9, IOB2) as three token-level tasks over the same sentences
(tasks ``pos``, ``chunks``, ``ner`` as tfds names the features); splits ``train`` / ``validation``
(tfds ``dev``) / ``test``. Metric: token accuracy (padding excluded). Deviation: NER is usually
reported as entity-level (span) F1 with seqeval; the token-level metric here is what a streaming
per-batch statistic gives and is reported as such.

``glue`` (Wang et al., 2019; tfds ``glue/<task>``): SST-2 (accuracy), CoLA (Matthews correlation),
MRPC (F1 of the ``equivalent`` class) and RTE (accuracy), each a sentence(-pair) classification
task with its own inputs: a multi-input Benchmark (``multi_input=True``, one batch per task, as
LibMTL's multi-input setting). GLUE's test labels are hidden, so, as is usual, the tfds
``validation`` split is the ``test`` split here and a fixed-seed 10% of each training split
(``data.validation_fraction``) is held out as ``validation``.

Tokenisation (built in, deterministic, no downloads): lower-cased for GLUE, cased for CoNLL (case
carries entity information); GLUE text is split with the regex ``\\w+|[^\\w\\s]``, CoNLL uses its
given tokens. The vocabulary holds the training split's words with at least ``data.min_count``
occurrences (default 1 for GLUE, 2 for CoNLL so that the model sees ``[UNK]`` in training), at most
``data.vocab_size`` of them, ordered by (-count, word). Ids: 0 ``[PAD]``, 1 ``[UNK]``, 2 ``[CLS]``,
3 ``[SEP]``. A GLUE input is ``[CLS] s1 [SEP]`` or ``[CLS] s1 [SEP] s2 [SEP]``; sequences longer
than ``data.max_length`` (default 128) are truncated (pairs: the longer sentence first).

Batches (the transformer backbone's input format): ``{'inputs': {'tokens': int32 [B, T], 'mask':
bool [B, T]}, 'targets': ...}``; CoNLL targets ``int32 [B, T]`` with -1 at padding;
``T = data.max_length``: fixed, so one compilation serves every batch. GLUE labels are float32
``[B]`` in {0, 1} (all four tasks are binary: one logit and BCE).
"""

from __future__ import annotations

import collections
import re

import numpy as np

from mtl_jax.data import common, tfds_utils
from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import register

PAD, UNK, CLS, SEP = 0, 1, 2, 3
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
SPLITS = ("train", "validation", "test")
IGNORE = -1

CONLL_TASKS = ("pos", "chunks", "ner")
CONLL_CLASSES = {"pos": 47, "chunks": 23, "ner": 9}
CONLL_SPLITS = {"train": "train", "validation": "dev", "test": "test"}

GLUE_TASKS = ("sst2", "cola", "mrpc", "rte")
GLUE_TEXT = {"sst2": ("sentence",), "cola": ("sentence",), "mrpc": ("sentence1", "sentence2"),
             "rte": ("sentence1", "sentence2")}
GLUE_METRIC = {"sst2": "accuracy", "cola": "mcc", "mrpc": "f1", "rte": "accuracy"}
MOCK_SIZES = {"train": 40, "validation": 16, "test": 16}
# Encoder depth of this library's text protocol (configs/conll_base.py, glue_base.py: 2 layers).
NUM_LAYERS = 2
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def split_words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def build_vocab(sentences, vocab_size: int = 30000, min_count: int = 1) -> dict[str, int]:
  """``word -> id`` over tokenised training sentences; deterministic (ties broken by the word)."""
  counts = collections.Counter(w for s in sentences for w in s)
  words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  words = words[:max(0, vocab_size - len(SPECIALS))]
  return {w: i + len(SPECIALS) for i, w in enumerate(words)}


def encode(words, vocab) -> list[int]:
  return [vocab.get(w, UNK) for w in words]


def pad(ids_list, max_length: int):
  """Lists of ids → ``tokens int32 [N, T]`` and ``mask bool [N, T]`` (truncating at T)."""
  tokens = np.full((len(ids_list), max_length), PAD, np.int32)
  for i, ids in enumerate(ids_list):
    ids = ids[:max_length]
    tokens[i, :len(ids)] = ids
  return tokens, tokens != PAD


def pair_ids(a: list[int], b: list[int] | None, max_length: int) -> list[int]:
  """``[CLS] a [SEP] (b [SEP])`` truncated to ``max_length``, trimming the longer sentence."""
  a, b = list(a), (list(b) if b is not None else None)
  budget = max_length - (3 if b is not None else 2)
  while len(a) + (len(b) if b is not None else 0) > budget:
    if b is not None and len(b) > len(a):
      b.pop()
    else:
      a.pop()
  return [CLS] + a + [SEP] + ((b + [SEP]) if b is not None else [])


# ------------------------------------------------------------------------------------ CoNLL-2003


def _conll_examples(config, split):
  if common.config_get(config, "data.mock", False):
    return tfds_utils.mock_examples("conll2003", "train", MOCK_SIZES[split])
  source = tfds_utils.open_source("conll2003", CONLL_SPLITS[split],
                                  common.config_get(config, "data.data_dir", ""))
  return [source[i] for i in range(len(source))]


def conll_arrays(examples, vocab, tasks, max_length):
  """Token ids, mask and per-task tag arrays (-1 at padding). Tokens and tags of one sentence are
  cut to their common length (they always agree in the real data; mock data draws them apart)."""
  ids, tags = [], {t: [] for t in tasks}
  for e in examples:
    words = [_text(w) for w in e["tokens"]]
    n = min([len(words)] + [len(e[t]) for t in tasks])
    ids.append(encode(words[:n], vocab))
    for t in tasks:
      tags[t].append(np.asarray(e[t][:n]))
  tokens, mask = pad(ids, max_length)
  out = {}
  for t in tasks:
    arr = np.full((len(examples), max_length), IGNORE, np.int32)
    for i, y in enumerate(tags[t]):
      y = y[:max_length]
      arr[i, :len(y)] = y
    out[t] = arr
  return {"tokens": tokens, "mask": mask}, out


def _tasks_conll(names, config):
  from mtl_jax import tasks as T  # pylint: disable=g-import-not-at-top
  from mtl_jax.models import heads  # pylint: disable=g-import-not-at-top

  return tuple(T.token_classification_task(n, CONLL_CLASSES[n],
                                           head=lambda n=n: heads.TokenHead(CONLL_CLASSES[n]))
               for n in names)


def _array_loader(arrays_by_split, sizes, workers=0):
  def loader(split, batch_size, seed=0, shuffle=None, process_index=0, process_count=1,
             position=0):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    inputs, targets = arrays_by_split[split]

    def fetch(idx):
      return {"inputs": {k: v[idx] for k, v in inputs.items()},
              "targets": {k: v[idx] for k, v in targets.items()}}

    shuffle = split == "train" if shuffle is None else shuffle
    return ArrayLoader(sizes[split], fetch, batch_size, seed=seed, shuffle=shuffle,
                       process_index=process_index, process_count=process_count,
                       position=position, workers=workers)

  return loader


@register("conll2003")
def get_conll(config) -> Benchmark:
  tasks = common.select(config.tasks, CONLL_TASKS, "conll2003 tasks")
  max_length = int(common.config_get(config, "data.max_length", 128))
  examples = {s: _conll_examples(config, s) for s in SPLITS}
  vocab = build_vocab([[_text(w) for w in e["tokens"]] for e in examples["train"]],
                      int(common.config_get(config, "data.vocab_size", 30000)),
                      int(common.config_get(config, "data.min_count", 2)))
  arrays = {s: conll_arrays(examples[s], vocab, tasks, max_length) for s in SPLITS}
  sizes = {s: len(examples[s]) for s in SPLITS}
  vocab_size = len(vocab) + len(SPECIALS)
  return Benchmark(
      name="conll2003", tasks=_tasks_conll(tasks, config),
      backbone=common.backbone(config, "transformer", vocab_size=vocab_size, max_len=max_length,
                        num_layers=NUM_LAYERS),
      loader=_array_loader(arrays, sizes, common.workers(config, file_backed=False)),
      reference={}, split_sizes=sizes,
      info={"vocab_size": vocab_size, "max_length": max_length,
            "mock": bool(common.config_get(config, "data.mock", False))})


# ------------------------------------------------------------------------------------------ GLUE


def _glue_raw(config, task):
  """``{split: list of examples}`` with the hidden-label test split replaced (see module doc)."""
  if common.config_get(config, "data.mock", False):
    return {s: tfds_utils.mock_examples(f"glue/{task}", "train", MOCK_SIZES[s]) for s in SPLITS}
  data_dir = common.config_get(config, "data.data_dir", "")
  train = tfds_utils.open_source(f"glue/{task}", "train", data_dir)
  dev = tfds_utils.open_source(f"glue/{task}", "validation", data_dir)
  frac = float(common.config_get(config, "data.validation_fraction", 0.1))
  tr, va = common.split_indices(len(train), (1 - frac, frac), seed=0)
  return {"train": [train[int(i)] for i in tr], "validation": [train[int(i)] for i in va],
          "test": [dev[i] for i in range(len(dev))]}


def glue_arrays(examples, task, vocab, max_length):
  fields = GLUE_TEXT[task]
  ids = []
  for e in examples:
    parts = [encode(split_words(_text(e[f])), vocab) for f in fields]
    ids.append(pair_ids(parts[0], parts[1] if len(parts) > 1 else None, max_length))
  tokens, mask = pad(ids, max_length)
  labels = np.array([int(e["label"]) for e in examples], np.float32)
  return {"tokens": tokens, "mask": mask}, labels


def _ignored(labels: np.ndarray) -> np.ndarray:
  """Labels that every masked loss and metric skips: NaN (float targets) or -1 (class ids)."""
  return np.full_like(labels, np.nan if labels.dtype.kind == "f" else IGNORE)


class MultiInputLoader:
  """One :class:`ArrayLoader` per task sharing one position: ``next()`` gives ``{task: batch}``.

  Training: every task loader advances one batch per step, each cycling through its own epochs, so
  small tasks are revisited more often (LibMTL's multi-input convention). ``batches_per_epoch`` is
  the largest task's. Evaluation (:meth:`epoch`): every task's split exactly once, in order; once a
  task has run out, its slot carries its first batch with every label ignored (NaN / -1), which the masked
  metrics ignore, so every batch has every task and the sums count each example once.
  """

  def __init__(self, loaders: dict[str, ArrayLoader]):
    self.loaders = loaders

  @property
  def position(self) -> int:
    return next(iter(self.loaders.values())).position

  @position.setter
  def position(self, value: int) -> None:
    for l in self.loaders.values():
      l.position = int(value)

  @property
  def batches_per_epoch(self) -> int:
    return max(l.batches_per_epoch for l in self.loaders.values())

  def __iter__(self):
    return self

  def __next__(self):
    return {t: next(l) for t, l in self.loaders.items()}

  def epoch(self):
    for b in range(self.batches_per_epoch):
      out = {}
      for t, l in self.loaders.items():
        if b < l.batches_per_epoch:
          out[t] = l.fetch(l.indices(b))
        else:
          first = l.fetch(l.indices(0))
          out[t] = {"inputs": first["inputs"],
                    "targets": {k: _ignored(v) for k, v in first["targets"].items()}}
      yield out


def matthews_corrcoef(threshold: float = 0.0, name: str = "mcc"):
  """Matthews correlation of binary logits over the split (CoLA's GLUE metric); NaN targets are
  ignored; 0 when a margin of the confusion matrix is empty (scikit-learn's convention)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mtl_jax.tasks import Metric  # pylint: disable=g-import-not-at-top

  def stats(logits, target):
    target = jnp.asarray(target, jnp.float32)
    logits = jnp.reshape(logits, target.shape)
    valid = ~jnp.isnan(target)
    t, p = (target > 0.5) & valid, (logits > threshold) & valid
    return {"tp": jnp.sum(t & p), "fp": jnp.sum(~t & p & valid), "fn": jnp.sum(t & ~p),
            "tn": jnp.sum(~t & ~p & valid)}

  def result(s):
    tp, fp, fn, tn = (float(s[k]) for k in ("tp", "fp", "fn", "tn"))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / den) if den > 0 else 0.0

  return Metric(name, True, stats, result)


def _tasks_glue(names):
  """Every GLUE task here is binary: one logit on the masked-mean pooled sentence features
  (transformer ``output='pooled'``), BCE; metrics as
  GLUE reports them (SST-2, RTE: accuracy; CoLA: MCC; MRPC: F1 of ``equivalent``, and accuracy)."""
  from mtl_jax import tasks as T  # pylint: disable=g-import-not-at-top

  out = []
  for n in names:
    base = T.binary_task(n)
    acc, f1 = T.binary_accuracy(), T.binary_f1()
    metrics = {"accuracy": (acc,), "mcc": (matthews_corrcoef(), acc), "f1": (f1, acc)}[GLUE_METRIC[n]]
    out.append(T.Task(n, base.head, base.loss, metrics, GLUE_METRIC[n]))
  return tuple(out)


@register("glue")
def get_glue(config) -> Benchmark:
  tasks = common.select(config.tasks, GLUE_TASKS, "glue tasks")
  max_length = int(common.config_get(config, "data.max_length", 128))
  raw = {t: _glue_raw(config, t) for t in tasks}
  train_sentences = [split_words(_text(e[f])) for t in tasks for e in raw[t]["train"]
                     for f in GLUE_TEXT[t]]
  vocab = build_vocab(train_sentences, int(common.config_get(config, "data.vocab_size", 30000)),
                      int(common.config_get(config, "data.min_count", 1)))
  arrays = {t: {s: glue_arrays(raw[t][s], t, vocab, max_length) for s in SPLITS} for t in tasks}
  sizes = {s: {t: len(raw[t][s]) for t in tasks} for s in SPLITS}

  def loader(split, batch_size, seed=0, shuffle=None, process_index=0, process_count=1,
             position=0):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    shuffle = split == "train" if shuffle is None else shuffle
    loaders = {}
    for i, t in enumerate(tasks):
      inputs, labels = arrays[t][split]

      def fetch(idx, inputs=inputs, labels=labels, t=t):
        return {"inputs": {k: v[idx] for k, v in inputs.items()}, "targets": {t: labels[idx]}}

      loaders[t] = ArrayLoader(sizes[split][t], fetch, batch_size, seed=seed * 1000003 + i,
                               shuffle=shuffle, process_index=process_index,
                               process_count=process_count, position=position)
    return MultiInputLoader(loaders)

  vocab_size = len(vocab) + len(SPECIALS)
  return Benchmark(
      name="glue", tasks=_tasks_glue(tasks),
      backbone=common.backbone(config, "transformer", vocab_size=vocab_size, max_len=max_length,
                        num_layers=NUM_LAYERS, output="pooled"),
      loader=loader, reference={}, multi_input=True,
      split_sizes={s: sum(sizes[s].values()) for s in SPLITS},
      info={"vocab_size": vocab_size, "max_length": max_length, "task_split_sizes": sizes,
            "mock": bool(common.config_get(config, "data.mock", False))})
