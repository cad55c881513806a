"""Backbones: where weights come from (`loading`, `gguf`), how each model family behaves
(`families`, with its entries in families.yaml), what a sentence-transformers folder asks for
(`sentence_folders`), and running a backbone on texts (`forward`)."""

from adapterlab.backbones.families import FAMILIES, Family, family_of
from adapterlab.backbones.forward import Features, Prefix, Stem, features, model_inputs, stem_states, tokenize
from adapterlab.backbones.loading import (PACKAGED, Backbone, BackboneError, cache_dir, check_backbone, fingerprint,
                                          load_backbone, resolve_path, weight_bytes)

__all__ = ["FAMILIES", "PACKAGED", "Backbone", "BackboneError", "Family", "Features", "Prefix", "Stem", "cache_dir",
           "check_backbone", "family_of", "features", "fingerprint", "load_backbone", "model_inputs", "resolve_path",
           "stem_states", "tokenize", "weight_bytes"]
