"""QM9 raw records -> PyG-style molecular graphs (pure numpy + RDKit), and the on-disk cache.

Sources of raw records (both give the QM9 paper's numbers: Ramakrishnan et al., "Quantum chemistry
structures and properties of 134 kilo molecules", Sci. Data 1, 140022 (2014)):

* ``qm9pack`` (offline, installed): the 130,831 characterised molecules as CSV (SMILES, elements,
  B3LYP coordinates in Angstrom, properties in Hartree / Debye / bohr^3 / bohr^2 / cal/(mol K)).
* tfds ``qm9/original`` when prepared (``charges``, ``positions``, ``SMILES`` and the same labels).

Targets follow PyTorch Geometric's ``QM9`` (indices 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11 as the
Nash-MTL code selects them) in the units the Nash-MTL code *reports*: homo, lumo, zpve, U0, U, H, G
in meV (PyG's eV times 1000, as ``multiply_indx`` in ``experiments/quantum_chemistry/utils.py``),
mu in Debye, alpha in bohr^3, r2 in bohr^2, Cv in cal/(mol K). U0/U/H/G are atomization energies:
the total energy minus the sum of the QM9 paper's B3LYP/6-31G(2df,p) atomic reference energies
(figshare "Atomref", doi:10.6084/m9.figshare.1057643). Hartree -> eV uses PyG's constant
27.211386246 (CODATA 2018). Deviation: PyG converts DeepChem's kcal/mol atomization energies with
0.04336414 eV/(kcal/mol); we convert from Hartree directly (differences ~1e-6 relative).

Node features (11, PyG's order): one-hot H, C, N, O, F; atomic number; aromatic; sp; sp2; sp3;
number of bonded hydrogens. Bond types (4): single, double, triple, aromatic.

Bond perception (PyG reads bonds from DeepChem's ``gdb9.sdf``, which qm9pack does not carry): the
molecule's SMILES (the GDB-17 SMILES of the QM9 files), with explicit hydrogens, is matched with
RDKit onto the distance-based connectivity of the coordinates (covalent radii, RDKit's
``DetermineConnectivity``), bond orders ignored in the match, so every atom keeps its coordinate
order; bond orders, aromaticity and hybridisation come from the sanitised SMILES. Where the SMILES
graph does not embed in the geometry's connectivity (the relaxed structure rearranged), bonds and
orders are perceived from the geometry alone (RDKit ``DetermineBonds``, the xyz2mol algorithm);
where that fails too, the geometry's connectivity is kept with every bond single and no
aromaticity. The method used for each molecule is stored (``perception``: 0 SMILES, 1 geometry,
2 connectivity only). Differences from PyG's SDF bonds are therefore possible for those molecules.

PyG's ``QM9`` reads the SDF with ``sanitize=False``, so in the features PyG actually produces (and
Nash-MTL trained on) the aromatic and sp/sp2/sp3 node columns and the aromatic bond column are
zero for every atom, and bonds keep their Kekule orders (pyg issue #8370). ``feature_set='pyg'``
reproduces exactly that; ``feature_set='full'`` fills them from RDKit's sanitised molecule (and
types aromatic bonds as aromatic).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

HARTREE_TO_EV = 27.211386246  # PyG's HAR2EV (CODATA 2018)
TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
UNITS = {"mu": "D", "alpha": "bohr^3", "homo": "meV", "lumo": "meV", "r2": "bohr^2",
         "zpve": "meV", "U0": "meV", "U": "meV", "H": "meV", "G": "meV", "Cv": "cal/mol/K"}
SYMBOLS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
SYMBOL_OF_Z = {z: s for s, z in ATOMIC_NUMBER.items()}
# Atomic reference energies (Hartree) of the QM9 paper: U(0 K), U(298.15 K), H(298.15 K),
# G(298.15 K), computed with B3LYP/6-31G(2df,p) (figshare 1057643, "atomref.txt").
ATOM_REF_HARTREE = {
    "U0": {"H": -0.500273, "C": -37.846772, "N": -54.583861, "O": -75.064579, "F": -99.718730},
    "U": {"H": -0.498857, "C": -37.845355, "N": -54.582445, "O": -75.063163, "F": -99.717314},
    "H": {"H": -0.497912, "C": -37.844411, "N": -54.581501, "O": -75.062219, "F": -99.716370},
    "G": {"H": -0.510927, "C": -37.861317, "N": -54.598897, "O": -75.079532, "F": -99.733544},
}
# Raw columns (QM9 native units) in the order the featuriser expects them.
RAW_KEYS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
QM9PACK_COLUMNS = {
    "mu": "Dipole_debye", "alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
    "r2": "R2_bohr2", "zpve": "ZPVE_au", "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au", "H": "Enthalphy_298K_au", "G": "GibbsFreeEnergy_298K_au",
    "Cv": "Heatcapacity_Cv_cal_mol_K",
}
NUM_NODE_FEATURES = 11
NUM_BOND_TYPES = 4
FEATURE_SETS = ("pyg", "full")
CACHE_VERSION = 1
QM9PACK_SIZE = 130_831
_QM9PACK_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


# ----------------------------------------------------------------------------------- targets

def atomization_energy(total_hartree: float, symbols: Iterable[str], kind: str = "U0") -> float:
  """Atomization energy (Hartree, negative for a bound molecule): E - sum of atomic references."""
  if kind not in ATOM_REF_HARTREE:
    raise ValueError(f"unknown energy {kind!r}; valid: {', '.join(ATOM_REF_HARTREE)}")
  ref = ATOM_REF_HARTREE[kind]
  return float(total_hartree) - sum(ref[s] for s in symbols)


def convert_targets(raw: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """QM9 native units -> the reported units of :data:`UNITS`.

  Args:
    raw: ``[M, 11]`` in the order of :data:`RAW_KEYS` (Debye, bohr^3, Hartree, Hartree, bohr^2,
      Hartree, Hartree total energies x4, cal/(mol K)).
    counts: ``[M, 5]`` number of H, C, N, O, F atoms per molecule.
  Returns:
    ``[M, 11]`` float64 in the order of :data:`TARGETS`.
  """
  raw = np.asarray(raw, np.float64)
  counts = np.asarray(counts, np.float64)
  out = raw.copy()
  mev = 1000.0 * HARTREE_TO_EV
  for k, name in enumerate(RAW_KEYS):
    if name in ATOM_REF_HARTREE:
      ref = np.array([ATOM_REF_HARTREE[name][s] for s in SYMBOLS])
      out[:, k] = (raw[:, k] - counts @ ref) * mev
    elif name in ("homo", "lumo", "zpve"):
      out[:, k] = raw[:, k] * mev
  return out


# -------------------------------------------------------------------------------- raw sources

def _parse_floats(text: str) -> np.ndarray:
  # qm9pack writes numbers such as "0." and "1."; float() parses them, json does not.
  return np.array(text.replace("[", "").replace("]", "").split(","), np.float64)


def qm9pack_data_folder() -> str:
  """The ``data`` folder of the installed ``qm9pack`` package, found without importing it.

  ``qm9pack.qm9pack_getdata`` imports ``pkg_resources``, which setuptools >= 81 no longer ships;
  the CSV files are package data, so the package's location is all we need.
  """
  import importlib.util
  spec = importlib.util.find_spec("qm9pack")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("QM9 offline needs the qm9pack package: pip install qm9pack==1.0.3")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
  if not os.path.isdir(folder):
    raise ImportError(f"qm9pack is installed but has no data folder at {folder}: "
                      "pip install --force-reinstall qm9pack==1.0.3")
  return folder


def read_qm9pack(limit: int | None = None) -> dict[str, Any]:
  """Raw records from the installed ``qm9pack`` CSV files, in QM9 index order.

  ``limit`` reads only the first ``limit`` molecules (tests). Returns ``index`` [M], ``symbols``
  (list of per-molecule lists), ``positions`` (list of [n, 3]), ``smiles`` (list) and ``raw``
  [M, 11] in QM9 native units (order :data:`RAW_KEYS`).
  """
  import pandas as pd  # pandas ships with tfds' dependencies; imported lazily.
  data_folder = qm9pack_data_folder()
  cols = ["Index", "SMILES", "Elements", "XYZ_Ang", *QM9PACK_COLUMNS.values()]
  frames, left = [], limit
  for name in _QM9PACK_FILES:
    if left is not None and left <= 0:
      break
    df = pd.read_csv(os.path.join(data_folder, name), usecols=cols, nrows=left)
    frames.append(df)
    if left is not None:
      left -= len(df)
  df = pd.concat(frames, ignore_index=True).sort_values("Index", kind="stable")
  symbols = [s.strip("[]").replace("'", "").split(",") for s in df["Elements"]]
  positions = [_parse_floats(x).reshape(-1, 3) for x in df["XYZ_Ang"]]
  raw = np.stack([df[QM9PACK_COLUMNS[k]].to_numpy(np.float64) for k in RAW_KEYS], axis=1)
  return dict(index=df["Index"].to_numpy(np.int64), symbols=symbols, positions=positions,
              smiles=[str(s) for s in df["SMILES"]], raw=raw)


def read_tfds(data_dir: str | None = None, limit: int | None = None) -> dict[str, Any]:
  """Raw records from tfds ``qm9/original`` (all molecules in its train split, in QM9 order)."""
  import tensorflow_datasets as tfds
  try:
    src = tfds.data_source("qm9/original", split="train", data_dir=data_dir or None)
  except Exception as e:
    raise FileNotFoundError(
        "tfds qm9 is not prepared: run `tfds build qm9/original` (downloads from figshare) "
        "or use the offline source, config.data.source='qm9pack'") from e
  n = len(src) if limit is None else min(limit, len(src))
  index, symbols, positions, smiles, raw = [], [], [], [], []
  for i in range(n):
    ex = src[i]
    k = int(ex["num_atoms"])
    symbols.append([SYMBOL_OF_Z[int(z)] for z in ex["charges"][:k]])
    positions.append(np.asarray(ex["positions"][:k], np.float64))
    s = ex["SMILES"]
    smiles.append(s.decode() if isinstance(s, bytes) else str(s))
    index.append(int(ex["index"]))
    raw.append([float(ex[key]) for key in RAW_KEYS])
  return dict(index=np.array(index, np.int64), symbols=symbols, positions=positions,
              smiles=smiles, raw=np.array(raw, np.float64).reshape(-1, len(RAW_KEYS)))


# --------------------------------------------------------------------------- bond perception

def _xyz_mol(symbols: Sequence[str], pos: np.ndarray):
  from rdkit import Chem
  lines = [str(len(symbols)), ""]
  lines += [f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(symbols, pos)]
  return Chem.MolFromXYZBlock("\n".join(lines))


def _bond_code(bond, aromatic_as_aromatic: bool) -> int:
  from rdkit import Chem
  bt = bond.GetBondType()
  if aromatic_as_aromatic and bond.GetIsAromatic():
    return 3
  return {Chem.BondType.SINGLE: 0, Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2,
          Chem.BondType.AROMATIC: 3}.get(bt, 0)


def perceive(symbols: Sequence[str], pos: np.ndarray, smiles: str) -> dict[str, np.ndarray]:
  """Bonds, Kekule orders, aromaticity and hybridisation of one molecule in coordinate order.

  Returns ``bonds`` [B, 2] (i < j), ``kekule`` [B] (0 single, 1 double, 2 triple),
  ``bond_aromatic`` [B], ``atom_aromatic`` [n], ``hybrid`` [n] (0 other, 1 sp, 2 sp2, 3 sp3)
  and ``perception`` (0 SMILES, 1 geometry, 2 connectivity only); see the module docstring.
  """
  from rdkit import Chem
  from rdkit.Chem import rdDetermineBonds
  n = len(symbols)
  geo = _xyz_mol(symbols, pos)
  rdDetermineBonds.DetermineConnectivity(geo)
  mol, method = None, 2
  ref = Chem.MolFromSmiles(smiles) if smiles else None
  if ref is not None:
    ref = Chem.AddHs(ref)
    if ref.GetNumAtoms() == n:
      query = Chem.RWMol(ref)
      for b in query.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
      for a in query.GetAtoms():
        a.SetIsAromatic(False)
      match = geo.GetSubstructMatch(query)  # match[i_ref] = index in coordinate order
      if len(match) == n:
        order = [0] * n
        for i_ref, i_xyz in enumerate(match):
          order[i_xyz] = i_ref
        mol, method = Chem.RenumberAtoms(ref, order), 0
  if mol is None:
    try:
      cand = _xyz_mol(symbols, pos)
      rdDetermineBonds.DetermineBonds(cand, charge=0)
      Chem.SanitizeMol(cand)
      mol, method = cand, 1
    except Exception:  # xyz2mol finds no neutral valence assignment
      mol, method = geo, 2
  kek = Chem.Mol(mol)
  if method != 2:
    Chem.Kekulize(kek, clearAromaticFlags=True)
  bonds, kekule, arom = [], [], []
  for b, bk in zip(mol.GetBonds(), kek.GetBonds()):
    i, j = sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
    bonds.append((i, j))
    kekule.append(_bond_code(bk, False) if method != 2 else 0)
    arom.append(bool(b.GetIsAromatic()) if method != 2 else False)
  hyb_code = {Chem.HybridizationType.SP: 1, Chem.HybridizationType.SP2: 2,
              Chem.HybridizationType.SP3: 3}
  hybrid = [hyb_code.get(a.GetHybridization(), 0) if method != 2 else 0 for a in mol.GetAtoms()]
  atom_arom = [bool(a.GetIsAromatic()) if method != 2 else False for a in mol.GetAtoms()]
  return dict(bonds=np.array(bonds, np.int16).reshape(-1, 2), kekule=np.array(kekule, np.int8),
              bond_aromatic=np.array(arom, bool), atom_aromatic=np.array(atom_arom, bool),
              hybrid=np.array(hybrid, np.int8), perception=method)


# ------------------------------------------------------------------------------- featurising

def featurise(records: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Raw records -> flat arrays (the cache layout).

  Molecule ``m`` owns atoms ``node_offsets[m]:node_offsets[m+1]`` and bonds
  ``bond_offsets[m]:bond_offsets[m+1]`` (bond indices local to the molecule).
  """
  from rdkit import RDLogger
  RDLogger.DisableLog("rdApp.*")
  syms_all, pos_all, smiles = records["symbols"], records["positions"], records["smiles"]
  m = len(syms_all)
  z, pos, arom, hyb, bonds, kek, barom, meth = [], [], [], [], [], [], [], []
  n_nodes, n_bonds = np.zeros(m, np.int64), np.zeros(m, np.int64)
  counts = np.zeros((m, len(SYMBOLS)), np.int64)
  for i in range(m):
    s, p = syms_all[i], np.asarray(pos_all[i], np.float64)
    if len(s) != len(p):
      raise ValueError(f"molecule {i}: {len(s)} elements but {len(p)} coordinates")
    per = perceive(s, p, smiles[i])
    z.append(np.array([ATOMIC_NUMBER[a] for a in s], np.int8))
    pos.append(p.astype(np.float32))
    arom.append(per["atom_aromatic"])
    hyb.append(per["hybrid"])
    bonds.append(per["bonds"])
    kek.append(per["kekule"])
    barom.append(per["bond_aromatic"])
    meth.append(per["perception"])
    n_nodes[i], n_bonds[i] = len(s), len(per["bonds"])
    for a in s:
      counts[i, SYMBOLS.index(a)] += 1
  return dict(
      version=np.array(CACHE_VERSION), index=np.asarray(records["index"], np.int64),
      z=np.concatenate(z), pos=np.concatenate(pos), atom_aromatic=np.concatenate(arom),
      hybrid=np.concatenate(hyb), bonds=np.concatenate(bonds).reshape(-1, 2),
      kekule=np.concatenate(kek), bond_aromatic=np.concatenate(barom),
      perception=np.array(meth, np.int8),
      node_offsets=np.concatenate([[0], np.cumsum(n_nodes)]),
      bond_offsets=np.concatenate([[0], np.cumsum(n_bonds)]),
      counts=counts, targets=convert_targets(records["raw"], counts))


def node_features(cache: Mapping[str, np.ndarray], feature_set: str = "pyg") -> np.ndarray:
  """``[total_atoms, 11]`` float32 PyG node features for every atom of the cache."""
  if feature_set not in FEATURE_SETS:
    raise ValueError(f"unknown feature_set {feature_set!r}; valid: {', '.join(FEATURE_SETS)}")
  z = cache["z"].astype(np.int64)
  x = np.zeros((len(z), NUM_NODE_FEATURES), np.float32)
  type_idx = np.searchsorted(np.array([1, 6, 7, 8, 9]), z)
  x[np.arange(len(z)), type_idx] = 1.0
  x[:, 5] = z
  if feature_set == "full":
    x[:, 6] = cache["atom_aromatic"]
    for k in (1, 2, 3):
      x[:, 6 + k] = cache["hybrid"] == k
  # num_hs: hydrogens bonded to each atom (PyG counts them over the bond edges).
  mol_of_bond = np.repeat(np.arange(len(cache["bond_offsets"]) - 1), np.diff(cache["bond_offsets"]))
  base = cache["node_offsets"][:-1][mol_of_bond]
  i = cache["bonds"][:, 0].astype(np.int64) + base
  j = cache["bonds"][:, 1].astype(np.int64) + base
  x[:, 10] = (np.bincount(i, weights=z[j] == 1, minlength=len(z))
              + np.bincount(j, weights=z[i] == 1, minlength=len(z)))
  return x


def bond_types(cache: Mapping[str, np.ndarray], feature_set: str = "pyg") -> np.ndarray:
  """``[total_bonds]`` bond-type codes (0 single, 1 double, 2 triple, 3 aromatic)."""
  if feature_set not in FEATURE_SETS:
    raise ValueError(f"unknown feature_set {feature_set!r}; valid: {', '.join(FEATURE_SETS)}")
  codes = cache["kekule"].astype(np.int8).copy()
  if feature_set == "full":
    codes[cache["bond_aromatic"]] = 3
  return codes


# ------------------------------------------------------------------------------------ cache

def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "mtl_jax", "qm9")


def cache_path(cache_dir: str, source: str, limit: int | None) -> str:
  tag = "all" if limit is None else f"first{int(limit)}"
  return os.path.join(cache_dir, f"{source}_{tag}_v{CACHE_VERSION}.npz")


def load_or_build(source: str = "qm9pack", *, cache_dir: str | None = None,
                  limit: int | None = None, data_dir: str | None = None,
                  verbose: bool = False) -> dict[str, np.ndarray]:
  """The featurised arrays of ``source`` (``qm9pack`` | ``tfds``), built once and cached (.npz)."""
  if source not in ("qm9pack", "tfds"):
    raise ValueError(f"unknown QM9 source {source!r}; valid: qm9pack, tfds")
  path = cache_path(cache_dir or default_cache_dir(), source, limit)
  if os.path.exists(path):
    with np.load(path) as f:
      cache = {k: f[k] for k in f.files}
    if int(cache.get("version", -1)) == CACHE_VERSION:
      return cache
  t0 = time.perf_counter()
  records = read_qm9pack(limit) if source == "qm9pack" else read_tfds(data_dir, limit)
  cache = featurise(records)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + f".tmp{os.getpid()}.npz"
  np.savez(tmp, **cache)
  os.replace(tmp, path)  # atomic: concurrent builders never see a partial file
  if verbose:
    from absl import logging
    logging.info("QM9 %s: featurised %d molecules in %.1fs -> %s", source,
                 len(cache["index"]), time.perf_counter() - t0, path)
  return cache
