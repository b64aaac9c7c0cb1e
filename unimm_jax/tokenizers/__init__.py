"""Text and image tokenizers behind one small interface, and the registry of their kinds.

  base     the interfaces (TextTokenizer, ImageTokenizer), saved-file helpers, and the registry: one record per
           kind that makes, loads and sizes it (its geometry from the config alone)
  text     word, byte, sentencepiece
  hf       a Hugging Face tokenizer.json (the tokenizers package), for imported backbones
  image    pixel, patch (and quantize / dequantize); registers the learned kinds' geometry too
  learned  the fsq / vq autoencoder tokenizer (JAX; imported on use: ``from unimm_jax.tokenizers import learned``)

Importing this package registers the built-in kinds and imports no JAX, so ``configuration`` can ask the
registry for a kind's geometry before JAX starts. The names below are the package's public API; import
``learned`` explicitly.
"""

from unimm_jax.tokenizers.base import (
    FORMAT_VERSION, IMAGE_KINDS, IMAGE_TOKENIZER_FILE, TEXT_KINDS, TEXT_TOKENIZER_FILE, TOKENIZER_ENCODERS,
    ImageKind, ImageTokenizer, PathLike, TextKind, TextTokenizer, image_kind, load_image_tokenizer,
    load_text_tokenizer, make_text_tokenizer, register_image_kind, register_text_kind, text_kind)
from unimm_jax.tokenizers.image import (
    CODEBOOK_FILE, NoImageTokenizer, PatchTokenizer, PixelTokenizer, dequantize, patchify, quantize, unpatchify)
from unimm_jax.tokenizers.text import (
    SENTENCEPIECE_FILE, ByteTokenizer, SentencePieceTokenizer, WordTokenizer, join_words, split_words)
from unimm_jax.tokenizers.hf import HfTokenizer  # registered after the built-in text kinds
from unimm_jax.tokenizers import magvitv2  # registers the kind
from unimm_jax.tokenizers import vqgan  # registers the kind
