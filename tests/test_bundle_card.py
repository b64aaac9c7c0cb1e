"""The export bundle describes itself: the forward pass, run in numpy from ``model.json``'s ``conventions`` and
``model.safetensors`` alone, gives the logits of ``Pipeline.load(bundle)``.

The numpy forward below (:func:`numpy_forward`) knows nothing of unimm_jax: every convention (segments, id ranges,
MASK, which embeddings are added, the embedding scale, the norm epsilon, the q/k/v layout, qk-norm, which head
dimensions rotate and how they pair, the rotary frequencies and positions, the attention scale, the directional
and cross-modal heads, the tensor names, the scanned-layer layout, the output restriction) is read from the bundle,
so a change of the network that the card does not follow fails here. The bundle's weights are changed first so
that each convention moves the logits by far more than the tolerance (:func:`_bundle`).
"""

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unimm_jax import configuration, export, train
from unimm_jax.pipeline import Pipeline
from test_train import tiny_config  # pytest puts tests/ on sys.path (rootdir-less "prepend" import mode)

# The network settings of configs/shapes.py at a tiny size: fused q/k/v, qk-norm, rotary within a modality only,
# every head dimension rotating (2-D on the grid, base 100), image code features, one left- and one right-looking
# head, rotary plus learned absolute positions; padded embedding rows. Plus values that carry the learned
# positions (model.value_positions, on in configs/shapes_unified.py), which need the learned table.
SHAPES = {"model.qk_norm": True, "model.cross_modal_rope": False, "model.image_code_features": True,
          "model.directional_heads": 1, "model.rope_theta": 100.0, "model.rope_fraction": 1.0,
          "model.positions": "rope+learned", "model.fused_qkv": True, "model.vocab_multiple": 8,
          "sequence.id_align": 1, "model.value_positions": True}
# The other layouts of the same tensors: separate q/k/v, scanned (and rematerialised) layers, half of each head
# rotating, rotary positions only, aligned id ranges (unused ids between text and image), heads beyond the
# directional ones, one head where only text reads the image and one where only the image reads the text.
OTHER = {"model.fused_qkv": False, "model.scan_layers": True, "model.remat": "full", "model.rope_fraction": 0.5,
         "model.positions": "rope", "model.num_heads": 4, "model.directional_heads": 1, "sequence.id_align": 8,
         "model.vocab_multiple": 16, "model.cross_modal_heads": 1}
# An imported backbone's options (issue 25): 1-D rotary over the flat sequence, its norm epsilon, no embedding
# scale, no modality embedding, unrestricted logits.
BACKBONE = {"model.rope_layout": "sequence", "model.norm_eps": 1e-5, "model.embedding_scale": 1.0,
            "model.modality_embedding": False, "model.restrict_output": False, "model.positions": "rope",
            "model.rope_fraction": 1.0}
SETTINGS = {"shapes": SHAPES, "other": OTHER, "backbone": BACKBONE}


# ---- the numpy forward pass: model.json's conventions and the tensors, nothing else --------------------------------
def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps) * scale


def _softmax(s):
  e = np.exp(s - s.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def numpy_forward(conv: dict, w: dict, tokens: np.ndarray) -> np.ndarray:
  """float64 logits [B, S, V] of int tokens [B, S] from the conventions ``conv`` and the tensors ``w`` alone."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  segments, voc, emb = conv["sequence"]["segments"], conv["vocabulary"], conv["embedding"]
  s_len, eps = conv["sequence"]["length"], conv["norm"]["eps"]
  modality = np.zeros(s_len, int)        # modality id of each position
  segment = np.zeros(s_len, int)         # segment index of each position
  is_text = np.zeros(s_len, bool)
  for g, seg in enumerate(segments):
    modality[seg["start"]:seg["end"]] = seg["modality_id"]
    segment[seg["start"]:seg["end"]] = g
    is_text[seg["start"]:seg["end"]] = seg["modality"] == "text"

  # Input embedding.
  x = w[emb["token"]][tokens]
  if emb["code_features"]:
    c = emb["code_features"]
    lo, hi = c["ids"]
    table = w[c["features"]] @ w[c["projection"]]
    code = (tokens >= lo) & (tokens < hi)
    x = x + np.where(code[..., None], table[np.clip(tokens - lo, 0, hi - lo - 1)], 0.0)
  if emb["modality"]:
    rows = [emb["modality"]["row"][seg["modality"]] for seg in segments for _ in range(seg["end"] - seg["start"])]
    x = x + w[emb["modality"]["tensor"]][rows][None]
  if emb["learned_positions"]:
    parts = []
    for seg in segments:
      names, n = emb["learned_positions"][seg["name"]], seg["end"] - seg["start"]
      if "grid" in seg:
        r, c = np.divmod(np.arange(n), seg["grid"][1])
        parts.append(w[names["row"]][r] + w[names["col"]][c])
      else:
        parts.append(w[names["index"]][np.arange(n)])
    learned = np.concatenate(parts)                                                    # [S, D]
    x = x + learned[None]
  x = x * emb["scale"]

  # Rotary angles of the rotating pairs, per position.
  rot, att, lay = conv["rotary"], conv["attention"], conv["layers"]
  if rot:
    r, half = rot["rotating_dims"], rot["pair_offset"]
    pos = np.asarray(rot["positions"], np.float64)                                    # [S, 2]
    angle = pos[:, rot["position_component"]] * np.asarray(rot["frequencies"])        # [S, r/2]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]

    def rotate(t):                                                                     # [B, S, N, H]
      a, b = t[..., :half], t[..., half:r]
      return np.concatenate([a * cos - b * sin, a * sin + b * cos, t[..., r:]], axis=-1)
  n_heads = att["num_heads"]
  allowed = np.ones((n_heads, s_len, s_len), bool)
  text_pair = is_text[:, None] & is_text[None, :] & (segment[:, None] == segment[None, :])
  q_idx, k_idx = np.arange(s_len)[:, None], np.arange(s_len)[None, :]
  for head in att["left_heads"]:
    allowed[head] &= ~text_pair | (k_idx <= q_idx)
  for head in att["right_heads"]:
    allowed[head] &= ~text_pair | (k_idx >= q_idx)
  for head in att.get("text_reads_image_heads", []):
    allowed[head] &= ~(~is_text[:, None] & is_text[None, :])
  for head in att.get("image_reads_text_heads", []):
    allowed[head] &= ~(is_text[:, None] & ~is_text[None, :])

  for i in range(lay["num_layers"]):
    prefix = lay["prefix"].format(i=i)
    t = (lambda name: w[f"{prefix}/{name}"][i]) if lay["scan"] else (lambda name: w[f"{prefix}/{name}"])
    u = _rms(x, t(lay["attn_norm"]), eps)
    if "fused" in att["qkv"]:
      kernel = t(att["qkv"]["fused"])                                                  # [D, 3, N, H]
      q, k, v = (np.einsum("bsd,dnh->bsnh", u, kernel[:, att["qkv"]["order"].index(x_)]) for x_ in "qkv")
    else:
      q, k, v = (np.einsum("bsd,dnh->bsnh", u, t(att["qkv"][x_])) for x_ in "qkv")
    if att.get("value_positions"):
      v = v + np.einsum("sd,dnh->snh", learned, t(att["value_positions"]))[None]
    if att["qk_norm"]:
      q, k = _rms(q, t(att["qk_norm"]["q"]), eps), _rms(k, t(att["qk_norm"]["k"]), eps)
    score = lambda q, k: np.einsum("bqnh,bknh->bnqk", q, k) * att["scale"]
    scores = score(rotate(q), rotate(k)) if rot else score(q, k)
    if rot and not rot["cross_modal"]:
      same = (modality[:, None] == modality[None, :])[None, None]
      scores = np.where(same, scores, score(q, k))
    scores = np.where(allowed[None], scores, -np.inf)
    o = np.einsum("bnqk,bknh->bqnh", _softmax(scores), v)
    x = x + np.einsum("bqnh,nhd->bqd", o, t(att["out"]))
    u = _rms(x, t(lay["mlp_norm"]), eps)
    mlp = conv["mlp"]
    gate = u @ t(mlp["gate"])
    x = x + (gate / (1.0 + np.exp(-gate)) * (u @ t(mlp["up"]))) @ t(mlp["down"])

  out = conv["output"]
  logits = (_rms(x, w[out["final_norm"]], eps) @ w[out["head"]])[..., :out["columns"]]
  if out["restrict"]:
    ids = np.arange(out["columns"])[None, :]
    ok = np.zeros((s_len, out["columns"]), bool)
    for seg in segments:
      if seg["modality"] != "special":
        lo, hi = voc["ranges"][seg["modality"]]
        ok[seg["start"]:seg["end"]] = (ids >= lo) & (ids < hi) & (ids != voc["mask_id"])
    logits = np.where(ok[None], logits, out["fill"])
  return logits


# ---- bundles ---------------------------------------------------------------------------------------------------------
def _bundle(tmp_path_factory, name: str):
  """A tiny model of the named settings trained one step and exported (float32 safetensors), its bundle's weights
  then changed so that every convention moves the logits: the ones the initialiser leaves constant (the head, the
  norm scales) made random, and the input embeddings made small, so that the first norm's mean square is near its
  epsilon (1e-6 against 1e-5 then moves the logits by about 0.07)."""
  if any(k.split(".")[1] not in configuration.base_config()[k.split(".")[0]] for k in SETTINGS[name]):
    pytest.skip(f"the config has no field of {sorted(SETTINGS[name])} yet")
  root = tmp_path_factory.mktemp(name)
  config = tiny_config(**{"train.steps": 1, "ckpt.every_steps": 1, "optim.warmup_steps": 0,
                          "eval.num_generate": 4, "data.val_size": 16, "eval.batch_size": 16, **SETTINGS[name]})
  train.train_and_evaluate(config, root / "workdir")
  meta = export.export(root / "workdir", root / "bundle", dtype="float32", fmt="safetensors")
  rng = np.random.default_rng(0)
  path = root / "bundle" / "model.safetensors"
  tensors = load_file(str(path))
  for key, value in tensors.items():
    if key.endswith("/scale"):
      tensors[key] = (1.0 + 0.3 * rng.standard_normal(value.shape)).astype(np.float32)
    elif key == "head/kernel" or key.endswith("value_position/kernel"):   # (the latter starts at zero)
      tensors[key] = (rng.standard_normal(value.shape) / np.sqrt(value.shape[0])).astype(np.float32)
    elif ("/" not in key and key != "image_code_features") or key == "code_projection/kernel":
      tensors[key] = value * np.float32(0.01)   # input embeddings: first-norm inputs near eps in size
  save_file(tensors, str(path))
  return root / "bundle", meta


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def bundle_dir(request, tmp_path_factory):
  return _bundle(tmp_path_factory, request.param)


def _tokens(conv: dict, rng, batch: int = 3) -> np.ndarray:
  """int32 [B, S]: random ids of each segment's modality, about a third MASK; the last row all MASK."""
  voc = conv["vocabulary"]
  tokens = np.full((batch, conv["sequence"]["length"]), voc["mask_id"], np.int32)
  for seg in conv["sequence"]["segments"]:
    lo, hi = voc["ranges"][seg["modality"]]
    ids = seg["token_ids"] if "token_ids" in seg else rng.integers(lo, hi, (batch, seg["end"] - seg["start"]))
    tokens[:, seg["start"]:seg["end"]] = ids
  tokens[rng.random(tokens.shape) < 0.35] = voc["mask_id"]
  tokens[-1] = voc["mask_id"]
  return tokens


def test_numpy_forward_from_the_card_alone_gives_the_models_logits(bundle_dir):
  path, _ = bundle_dir
  meta = json.loads((path / "model.json").read_text())
  conv, weights = meta["conventions"], load_file(str(path / "model.safetensors"))
  tokens = _tokens(conv, np.random.default_rng(1))
  assert (tokens == conv["vocabulary"]["mask_id"]).mean() > 0.3

  got = numpy_forward(conv, weights, tokens)
  pipe = Pipeline.load(path)
  want = np.asarray(pipe.model.apply({"params": pipe.params}, tokens))
  assert got.shape == want.shape
  assert np.abs(want[want > -1e8]).max() > 1.0          # logits of a size that a wrong convention would move
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_the_conventions_name_every_tensor_with_its_shape(bundle_dir):
  """Every tensor of the bundle is one the conventions use, with the shape they state."""
  path, meta = bundle_dir
  conv, tensors = meta["conventions"], meta["tensors"]
  voc, att, lay = conv["vocabulary"], conv["attention"], conv["layers"]
  d, n, h = conv["d_model"], att["num_heads"], att["head_dim"]
  assert tensors[conv["embedding"]["token"]]["shape"] == [voc["padded_size"], d]
  assert tensors[conv["output"]["head"]]["shape"] == [d, voc["padded_size"]]
  assert voc["padded_size"] % voc["vocab_multiple"] == 0 and voc["padded_size"] >= voc["size"] > voc["mask_id"]
  block = (lambda name: tensors[f"{lay['prefix']}/{name}"]["shape"][1:]) if lay["scan"] else \
      (lambda name: tensors[f"{lay['prefix'].format(i=0)}/{name}"]["shape"])
  if "fused" in att["qkv"]:
    assert block(att["qkv"]["fused"]) == [d, 3, n, h]
  else:
    assert [block(att["qkv"][x]) for x in "qkv"] == [[d, n, h]] * 3
  assert block(att["out"]) == [n, h, d]
  if lay["scan"]:
    assert all(v["shape"][0] == lay["num_layers"] for k, v in tensors.items() if k.startswith("blocks/"))
  rot = conv["rotary"]
  if rot:
    assert rot["rotating_dims"] % 4 == 0 and 0 < rot["rotating_dims"] <= h
    assert len(rot["frequencies"]) == len(rot["position_component"]) == rot["pair_offset"]
    assert len(rot["positions"]) == conv["sequence"]["length"]


def test_the_card_states_the_conventions(bundle_dir):
  path, meta = bundle_dir
  conv, card = meta["conventions"], (path / "README.md").read_text()
  assert "## How to run the forward pass" in card
  for fact in (f"+ {conv['norm']['eps']!r}) * scale", f"x = x * {conv['embedding']['scale']!r}",
               f"* {conv['attention']['scale']!r}` (1/sqrt(H))", f"MASK = {conv['vocabulary']['mask_id']}",
               conv["sequence"]["describe"]):
    assert fact in card, fact
  if conv["rotary"]:
    assert f"= {conv['rotary']['rotating_dims']} dims of each head rotate" in card
    assert f"(x[j], x[j + {conv['rotary']['pair_offset']}])" in card
  if "fused" in conv["attention"]["qkv"]:
    assert f"`W = {conv['attention']['qkv']['fused']}` [D, 3, N, H]: `q = u @ W[:, 0]`" in card


def test_the_default_export_writes_the_tensor_names_the_readme_shows():
  """README.md's example tensor names of a bundle are those of the default export (fused q/k/v)."""
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  section = text[text.index("## Export a model"):text.index("## The report")]
  default = configuration.base_config().model
  assert default.fused_qkv and not default.scan_layers
  assert "`block_0/attn/qkv/kernel`" in section and "[d_model, 3, heads, head_dim]" in section
