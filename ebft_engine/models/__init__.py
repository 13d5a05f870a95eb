"""Models: getting weights and tokenizer (:mod:`.loading`), one adapter per architecture family (:mod:`.adapters`)
and the shape arithmetic built on them (:mod:`.shapes`).

Modules inside this package import from their siblings, never from here (the package's ``__init__`` imports
them all: that would be an import cycle).
"""
from .adapters import (ADAPTERS, FAMILIES, SUPPORTED_TYPES, BlockAdapter, BlockStructure, adapter_for,
                       adapter_for_block, adapter_for_config, check_architecture)
from .adapters.llama import (BLOCK_ARGUMENTS, CACHE_ARGUMENTS, INPUT_GROUPS, LINEAR_NAMES, LINEAR_PATHS, BlockKwargs,
                             LlamaAdapter)
# _CACHE, _CONFIG_CACHE and _local_folder are private, named here for the tests that reach into the cache
from .loading import (_CACHE, _CONFIG_CACHE, CACHE_MAX_PARAMS, EMBEDDED_GGUF, EMBEDDED_HUB_ID, EMBEDDED_NAME,
                      EMBEDDED_PACKAGE, LOADED_COUNTS, STRUCTURE_FILE, STRUCTURE_README, TINY_NAME, FileBackedBlocks,
                      ModelSource, _local_folder, byte_tokenizer, load_config, load_model, load_model_cached,
                      loaded_counts, read_structure, resolve_source, restore_blocks, restores_from_files, save_structure,
                      tiny_config)
from .shapes import block_params, config_counts, count_params, dense_numel, dense_shapes, projection_shapes

__all__ = ["ADAPTERS", "BLOCK_ARGUMENTS", "BlockAdapter", "BlockKwargs", "BlockStructure", "CACHE_ARGUMENTS",
           "CACHE_MAX_PARAMS", "EMBEDDED_GGUF", "EMBEDDED_HUB_ID", "EMBEDDED_NAME", "EMBEDDED_PACKAGE", "FAMILIES",
           "FileBackedBlocks", "INPUT_GROUPS", "LINEAR_NAMES", "LINEAR_PATHS", "LOADED_COUNTS", "LlamaAdapter",
           "ModelSource", "STRUCTURE_FILE", "STRUCTURE_README", "SUPPORTED_TYPES", "TINY_NAME", "adapter_for",
           "adapter_for_block", "adapter_for_config", "block_params", "byte_tokenizer", "check_architecture",
           "config_counts", "count_params", "dense_numel", "dense_shapes", "load_config", "load_model",
           "load_model_cached", "loaded_counts", "projection_shapes", "read_structure", "resolve_source",
           "restore_blocks", "restores_from_files", "save_structure", "tiny_config"]
