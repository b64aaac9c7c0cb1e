"""Weights from elsewhere, in and out: ``python -m unimm_jax.convert import|export --format=llada``.

``import`` reads a Hugging Face directory (``config.json``, ``model.safetensors`` or ``model.safetensors.index.json``
and its shards, ``tokenizer.json``), checks the upstream config against the target config field by field, and
writes an export bundle (``model.json``, ``tokenizers/``, the parameters, a model card) that ``Pipeline.load`` and
``--config.init.from`` read; the parameters are one ``model.safetensors`` from one process, an Orbax tree
``params/`` (each host writing its shards) from several. It streams: every parameter is made with
``jax.make_array_from_callback`` straight into its sharding on the config's mesh, each device's shard cut from
the one upstream tensor (or, for a fused q/k/v kernel or a scanned stack, the few tensors) read for it, large
tensors in blocks of rows; so a host holds its shards of the model plus at most the tensors of one parameter;
bfloat16 tensors are cast shard by shard.
Nothing is written to ``--out`` until every check has passed (the bundle is written beside it and renamed).

``export`` writes a bundle or a training workdir (LoRA runs merged) back in the upstream layout: config.json,
sharded safetensors with their index, the tokenizer files, each tensor in the upstream's dtype (the imported
checkpoint's, recorded in the bundle). The parameters are loaded once on the host (``Pipeline.load``, a LoRA
workdir merged) and each upstream tensor is made only when its bytes are written. Import then export gives the
upstream's bytes back.

Formats: ``llada`` (:mod:`unimm_jax.convert.llada`), ``mmada`` (:mod:`unimm_jax.convert.mmada`: the backbone
plus the MAGVIT-v2 codes and MMaDA's task formats; ``--image_tokenizer`` names the MAGVIT-v2 directory),
``lumina_dimoo`` (:mod:`unimm_jax.convert.lumina_dimoo`: the backbone plus the aMUSEd VQ-GAN codes, its row ends
and task formats; the VQ-GAN is the download's ``vqvae/`` unless ``--image_tokenizer`` says otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from unimm_jax import bundle, configuration, sharding as sharding_lib, storage
from unimm_jax.convert import llada, lumina_dimoo, mmada
from unimm_jax import safetensors_io as st
from unimm_jax.convert.llada import ConvertError

FORMATS = {"llada": llada, "mmada": mmada, "lumina_dimoo": lumina_dimoo}
ROW_BLOCK_BYTES = 64 * 2**20   # large single tensors are read in row blocks of this size (_in_row_blocks)
CONVERT_VERSION = 1
CONFIG_FILE = "config.json"


def _format(name: str):
  if name not in FORMATS:
    raise ConvertError(f"--format={name!r} is not one of {sorted(FORMATS)}")
  return FORMATS[name]


def _tokenizers(src: epath.Path, config, upstream: dict):
  from unimm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from unimm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  # An extended vocabulary (sequence.vocab_rows): exactly text.vocab_size ids are text, whatever else the
  # tokenizer names.
  text = _text_tokenizer(src, upstream, config.text.vocab_size,
                         text_ids=config.text.vocab_size if config.sequence.vocab_rows else 0)
  try:
    image = tokenizers.image_kind(config.image.tokenizer).make(config, [])
  except (ValueError, FileNotFoundError) as e:
    raise ConvertError(f"the image tokenizer: {e}") from e
  return input_pipeline.tokenizers_for(config, text, image)


def _abstract_params(config, layout, mesh):
  """({flat name: ShapeDtypeStruct}, {flat name: NamedSharding}) of the weights a run of ``config`` starts from
  (``TrainState.weights``: a LoRA run's base), placed as the trainer places them (``train_state.state_shardings``);
  nothing allocated."""
  from unimm_jax import train_state  # pylint: disable=g-import-not-at-top
  method = train_state.make_step_inputs(config, layout, platform=mesh.devices.flat[0].platform)
  abstract, shardings = train_state.state_shardings(method, mesh, sharding_lib.rules_of(config))
  return bundle.flatten(abstract.weights), bundle.flatten(shardings.weights)


def default_config(fmt: str, src, upstream: dict, *, seq_len: int | None = None, image_tokenizer: str = "",
                   lengths: dict[str, int] | None = None):
  """The unimm_jax config of the upstream checkpoint in ``src`` (its ``config.json`` already read as
  ``upstream``): the backbone over a text-only layout of ``seq_len`` tokens (llada), or the unified model with
  the MAGVIT-v2 tokenizer at ``image_tokenizer`` and the upstream's task formats (mmada; ``lengths``: its
  ``max_text_len``, ``question_len``, ``answer_len``)."""
  config = configuration.base_config()
  if fmt == "lumina_dimoo":
    return _lumina_config(config, src, upstream, image_tokenizer, lengths or {})
  if fmt != "mmada":
    return _format(fmt).apply_backbone(config, upstream, seq_len)
  if not image_tokenizer:
    raise ConvertError("--format=mmada needs --image_tokenizer=DIR: the MAGVIT-v2 weights the checkpoint's codes "
                       "are of (showlab/magvitv2, as safetensors)")
  from unimm_jax.tokenizers import magvitv2  # pylint: disable=g-import-not-at-top
  text = _text_tokenizer(src, upstream)
  try:
    arch = magvitv2.read_checkpoint(epath.Path(image_tokenizer))[0]
  except (ValueError, FileNotFoundError) as e:
    raise ConvertError(f"--image_tokenizer={image_tokenizer}: {e}") from e
  codebook = int(upstream.get("codebook_size", 8192))
  if arch.codebook_size != codebook:
    raise ConvertError(f"{src}/config.json codebook_size={codebook} but the MAGVIT-v2 tokenizer at "
                       f"{image_tokenizer} has {arch.codebook_size} codes: the image ids would not be its codes")
  mmada.apply_unified(config, upstream, text_vocab=text.vocab_size, task_ids=mmada.special_ids(text),
                      downsample=arch.downsample, **(lengths or {}))
  config.image.tokenizer_path = str(image_tokenizer)
  return config


def _lumina_config(config, src: epath.Path, upstream: dict, image_tokenizer: str, lengths: dict):
  from unimm_jax.tokenizers import vqgan  # pylint: disable=g-import-not-at-top
  path = image_tokenizer or str(src / "vqvae")
  try:
    vq = vqgan.read_config(path, "--image_tokenizer")
  except (ValueError, FileNotFoundError) as e:
    raise ConvertError(str(e)) from e
  text = _text_tokenizer(src, upstream)
  lumina_dimoo.apply_unified(config, upstream, codebook_size=vq.num_vq_embeddings, downsample=vq.downsample,
                             task_ids=lumina_dimoo.special_ids(text), **lengths)
  config.image.tokenizer_path = str(path)
  return config


def _text_tokenizer(src: epath.Path, upstream: dict, vocab_size: int = 0, text_ids: int = 0):
  from unimm_jax import tokenizers  # pylint: disable=g-import-not-at-top
  if not (src / "tokenizer.json").exists():
    raise ConvertError(f"{src}: no tokenizer.json (download the whole model directory, tokenizer files included)")
  return tokenizers.HfTokenizer.from_path(src, vocab_size=vocab_size, pad_id=upstream.get("pad_token_id"),
                                          text_ids=text_ids)


def import_checkpoint(fmt: str, src, out, config=None, *, seq_len: int | None = None,
                      image_tokenizer: str = "", lengths: dict[str, int] | None = None) -> dict:
  """Converts the upstream checkpoint in ``src`` to a bundle in ``out`` (module docstring); returns its
  ``model.json``. ``config``: the target config (checked against the upstream's), or None for the upstream's
  architecture over a text-only layout of ``seq_len`` tokens."""
  out = storage.absolute_path(out)
  if out.exists() and any(out.iterdir()):
    raise ConvertError(f"--out={out} exists and is not empty; choose a new directory")
  start = time.perf_counter()
  # One process writes one file, each parameter made on the host on its turn (nothing is placed: a host would
  # otherwise hold the model twice, once placed and once as the copies the writer reads); several processes
  # place their shards and write them with Orbax.
  imported = import_params(fmt, src, config, seq_len=seq_len, place=jax.process_count() > 1,
                           image_tokenizer=image_tokenizer, lengths=lengths)
  write_bundle(imported, out)
  logging.info("imported %s -> %s: %s parameters in %.1f s", src, out, f"{imported.meta['param_count']:,}",
               time.perf_counter() - start)
  return imported.meta


@dataclasses.dataclass
class Imported:
  """An imported model: parameters in their shardings on ``mesh``, the tokenizers and the bundle's model.json."""

  params: dict[str, Any]           # flat name -> jax.Array (placed), or a function making its host value
  meta: dict[str, Any]
  tokenizers: Any                  # input_pipeline.Tokenizers
  mesh: Any
  shapes: dict[str, Any]           # flat name -> jax.ShapeDtypeStruct


def import_params(fmt: str, src, config=None, *, seq_len: int | None = None, place: bool = True,
                  image_tokenizer: str = "", lengths: dict[str, int] | None = None) -> Imported:
  """Reads and checks the upstream checkpoint in ``src`` (see :func:`import_checkpoint`) and, with ``place``,
  places every parameter into its sharding on the config's mesh; writes nothing. Without ``place``,
  ``Imported.params`` holds, per parameter, a function that makes its whole value on the host (the one-process
  bundle writer streams them to a file)."""
  module = _format(fmt)
  src = epath.Path(src)
  if not (src / CONFIG_FILE).exists():
    raise ConvertError(f"{src}: no {CONFIG_FILE} (is it a Hugging Face model directory?)")
  upstream = json.loads((src / CONFIG_FILE).read_text())
  if config is None:
    config = default_config(fmt, src, upstream, seq_len=seq_len, image_tokenizer=image_tokenizer, lengths=lengths)
  else:
    config = configuration.from_dict(config.to_dict())   # an unlocked copy
    if image_tokenizer:
      config.image.tokenizer_path = str(image_tokenizer)
    elif fmt == "lumina_dimoo" and not config.image.tokenizer_path:
      config.image.tokenizer_path = str(src / "vqvae")
    if hasattr(module, "special_ids") and (src / "tokenizer.json").exists():
      # The checkpoint's tokenizer is the authority on its special tokens' ids.
      found = module.special_ids(_text_tokenizer(src, upstream))
      said = dict(config.sequence.special_ids)
      for name, i in found.items():
        if name in said and said[name] != i:
          logging.warning("%s: the tokenizer gives %s the id %d (the config said %d): using the tokenizer's", src,
                          name, i, said[name])
      config.sequence.special_ids = {**said, **found}
      if config.model.pad_key_id >= 0:
        config.model.pad_key_id = found.get(getattr(module, "PAD", ""), config.model.pad_key_id)
      if config.model.image_row_end_id >= 0:
        config.model.image_row_end_id = found.get("<end-of-line>", config.model.image_row_end_id)
  configuration.validate(config)
  reader = st.CheckpointReader(src)
  toks = _tokenizers(src, config, upstream)
  layout = toks.layout
  module.check_config(upstream, config, layout)
  mappings = module.tensor_map(config, layout.size)
  module.check_tensors(reader, mappings)

  mesh = sharding_lib.make_mesh(config.mesh.shape)
  shapes, shardings = _abstract_params(config, layout, mesh)
  scan = bool(config.model.scan_layers)
  by_path: dict[str, list] = {}
  for mp in mappings:
    by_path.setdefault(module.param_path(mp, scan), []).append(mp)
  if set(by_path) != set(shapes):
    missing, extra = sorted(set(shapes) - set(by_path)), sorted(set(by_path) - set(shapes))
    raise ConvertError(f"the {fmt} mapping and the model disagree: parameters without a source {missing}, "
                       f"sources without a parameter {extra}")
  logging.info("importing %s (%d tensors, %.2f GB) into %d parameters%s", src, len(reader.names()),
               reader.total_bytes / 1e9, len(shapes), f" on mesh {dict(mesh.shape)}" if place else "")
  params = {}
  for i, (path, target) in enumerate(sorted(shapes.items())):
    maps = sorted(by_path[path], key=lambda m: -1 if m.layer is None else m.layer)
    shard = _shard_builder(reader, maps, target.shape, np.dtype(target.dtype), scan)
    if not place:
      full = tuple(slice(None) for _ in target.shape)
      params[path] = lambda shard=shard, full=full: shard(full)
      continue
    array = jax.make_array_from_callback(target.shape, shardings[path], shard)
    if array.shape != target.shape:
      raise ConvertError(f"{path}: built {array.shape}, the model has {target.shape}")
    params[path] = array
    logging.log_every_n(logging.INFO, "imported %d/%d parameters", 16, i + 1, len(shapes))
  from unimm_jax import export  # pylint: disable=g-import-not-at-top
  meta = export.bundle_meta(config, layout, shapes, step=0, weights="imported", dtype=str(config.model.param_dtype),
                            fmt="orbax")
  meta["source"] = {"format": fmt, "convert_version": CONVERT_VERSION, "path": str(src), "config": upstream,
                    "tensor_dtypes": {n: st.NAMES[reader.info(n).dtype] for n in reader.names()}}
  return Imported(params, meta, toks, mesh, shapes)


def _shard_builder(reader, maps, shape, dtype, scan: bool):
  """index -> the numpy value of that shard of one parameter (``maps``: its upstream mappings, one per layer of a
  scanned stack), read from the upstream tensors when asked and not kept: every shard of a parameter made from
  small tensors re-reads them, a large single tensor is read in row blocks."""
  def per_layer(mp):
    return mp.to_ours([reader.read(name) for name in mp.sources])

  if maps[0].layer is not None and scan:   # one slice of the stack per layer
    def shard(index):
      layers = range(len(maps))[index[0]]
      return np.stack([np.asarray(per_layer(maps[l])[tuple(index[1:])], dtype) for l in layers])
  elif maps[0].rows_to is not None and reader.info(maps[0].sources[0]).nbytes > ROW_BLOCK_BYTES:
    def shard(index):
      return _in_row_blocks(reader, maps[0], index, shape, dtype)
  else:
    def shard(index):
      return np.ascontiguousarray(per_layer(maps[0])[tuple(index)], dtype)
  return shard


def _in_row_blocks(reader, mp, index, shape, dtype) -> np.ndarray:
  """The shard ``index`` of a parameter made from one large 2-D upstream tensor (``mp.rows_to``), filled from
  blocks of the tensor's rows of at most :data:`ROW_BLOCK_BYTES`: the shard is the only full-size buffer (it
  becomes the device buffer), so the import holds no second copy of the model's largest tensors."""
  (name,) = mp.sources
  info = reader.info(name)
  axis, rows = mp.rows_to, info.shape[0]
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape)]
  out = np.zeros([len(r) for r in ranges], dtype)             # rows past the source's (vocabulary padding): zeros
  lo, hi = ranges[axis].start, min(ranges[axis].stop, rows)
  step = max(1, ROW_BLOCK_BYTES // max(info.nbytes // rows, 1))
  for r0 in range(lo, hi, step):
    r1 = min(r0 + step, hi)
    block = reader.read_rows(name, r0, r1)
    block = block if axis == 0 else block.T                    # the source's rows along the parameter's axis
    src = [slice(r.start, r.stop) for r in ranges]
    src[axis] = slice(None)
    dst = [slice(None)] * len(shape)
    dst[axis] = slice(r0 - lo, r1 - lo)
    out[tuple(dst)] = block[tuple(src)]
  return out


def write_bundle(imported: Imported, out: epath.Path) -> None:
  """The bundle of an import: written beside ``out`` and renamed to it when complete."""
  from unimm_jax import export  # pylint: disable=g-import-not-at-top
  partial = out.parent / (out.name + ".partial")
  if jax.process_index() == 0 and partial.exists():
    shutil.rmtree(partial)
  if jax.process_count() == 1:
    # One process: one model.safetensors, each tensor made (or copied to the host) on its turn. (Orbax's save
    # held a second copy of the model while writing: 4.8 GiB peak for a 2.5 GiB model, BENCHMARKS.md.)
    partial.mkdir(parents=True)
    make = lambda x: x if callable(x) else (lambda: np.asarray(x))
    planned = [st.Planned(name, tuple(imported.shapes[name].shape), np.dtype(imported.shapes[name].dtype),
                          make(x)) for name, x in sorted(imported.params.items())]
    st.write_checkpoint(partial, planned, max_shard_bytes=2**62, metadata={"format": "unimm_jax",
                                                                          "dtype": imported.meta["dtype"]})
    imported.meta["format"] = "safetensors"
  else:   # every host writes its own shards
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(partial / bundle.PARAMS_DIR, bundle.unflatten(imported.params))
    imported.meta["format"] = "orbax"
  if jax.process_index() == 0:
    imported.tokenizers.text.save(partial / "tokenizers")
    imported.tokenizers.image.save(partial / "tokenizers")
    (partial / bundle.MODEL_FILE).write_text(json.dumps(imported.meta, indent=1, default=float))
    (partial / "README.md").write_text(_card(imported.meta) + export.model_card(imported.meta))
    if out.exists():
      out.rmdir()
    partial.rename(out)


def _card(meta: dict) -> str:
  """What an imported bundle's model card says before the card of every bundle (``export.model_card``)."""
  src = meta["source"]
  return "\n".join([
      f"> Imported by `python -m unimm_jax.convert import --format={src['format']}` from `{src['path']}` "
      f"({meta['param_count']:,} parameters). Fine-tune with `--config.init.from=THIS_DIRECTORY`; hand back with "
      f"`python -m unimm_jax.convert export --format={src['format']} --workdir=THIS_DIRECTORY --out=DIR`.",
      "",
  ])


def export_checkpoint(fmt: str, path, out, *, dtype: str | None = None,
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes the bundle or workdir ``path`` to ``out`` in the upstream layout (module docstring); returns the
  file names written."""
  from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  module = _format(fmt)
  path, out = storage.absolute_path(path), epath.Path(out)
  if out.exists() and any(out.iterdir()):
    raise ConvertError(f"--out={out} exists and is not empty; choose a new directory")
  source = _recorded_source(path)
  pipe = Pipeline.load(path)
  config, layout = pipe.config, pipe.layout
  base = source.get("config") if source.get("format") == fmt else None
  upstream = module.upstream_config(config, layout, base)
  module.check_config(upstream, config, layout)
  recorded = source.get("tensor_dtypes", {}) if base is not None else {}
  if dtype is not None and dtype not in ("float32", "bfloat16"):
    raise ConvertError(f"--dtype={dtype!r} must be float32 or bfloat16")
  default = {"float32": "F32", "bfloat16": "BF16", None: None}[dtype]
  flat = bundle.flatten(pipe.params)
  scan = bool(config.model.scan_layers)
  planned = []
  for mp in module.tensor_map(config, layout.size):
    value = flat[module.param_path(mp, scan)]
    for j, (name, shape) in enumerate(zip(mp.sources, mp.shapes)):
      kind = default or recorded.get(name) or ("BF16" if upstream.get("torch_dtype") == "bfloat16" else "F32")
      np_dtype = st.DTYPES[kind]

      def make(mp=mp, value=value, j=j, np_dtype=np_dtype):
        layer = np.asarray(value) if (mp.layer is None or not scan) else np.asarray(value[mp.layer])
        return np.asarray(mp.to_upstream(layer)[j], np_dtype)
      planned.append(st.Planned(name, tuple(shape), np_dtype, make))
  tmp = out.parent / (out.name + ".partial")
  if tmp.exists():
    shutil.rmtree(tmp)
  files = st.write_checkpoint(tmp, planned, max_shard_bytes=max_shard_bytes)
  (tmp / CONFIG_FILE).write_text(json.dumps(upstream, indent=2))
  tok_dir = (path / "tokenizers")
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (tok_dir / name).exists():
      (tmp / name).write_text((tok_dir / name).read_text())
      files.append(name)
  if out.exists():
    out.rmdir()
  tmp.rename(out)
  logging.info("exported %s to %s (%s layout): %d files", path, out, fmt, len(files) + 1)
  return files + [CONFIG_FILE]


def _recorded_source(path: epath.Path) -> dict[str, Any]:
  """What a bundle (or the bundle a workdir's ``init.from`` names) recorded of its upstream checkpoint."""
  meta_file = path / bundle.MODEL_FILE
  if meta_file.exists():
    return json.loads(meta_file.read_text()).get("source", {})
  config_file = path / "config.json"
  if config_file.exists():
    init_from = json.loads(config_file.read_text()).get("init", {}).get("from", "")
    if init_from and (epath.Path(init_from) / bundle.MODEL_FILE).exists():
      return json.loads((epath.Path(init_from) / bundle.MODEL_FILE).read_text()).get("source", {})
  return {}
