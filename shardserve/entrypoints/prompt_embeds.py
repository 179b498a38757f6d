"""Prompt embeddings as inputs: decoding the HTTP form (base64 of a `torch.save`d tensor) and the checks the engine
runs on every prompt_embeds tensor, whether it came over HTTP or straight from the offline API.

The HTTP form is untrusted bytes fed to `torch.load`, which is how vLLM's decoder was exploited (CVE-2025-62164):
`weights_only=True` stops arbitrary pickled code, but it still rebuilds sparse tensors, and by default without
checking their indices, so a crafted sparse tensor made dense (`to_dense`) writes out of bounds. Here:

* the size is bounded from the base64 length before anything is decoded;
* only the zip format `torch.save` has written since PyTorch 1.6 is accepted, with stored (uncompressed) records:
  the legacy format allocates the byte count its pickle declares before reading any data, and a deflated record
  can expand far beyond the request's size;
* `torch.load` runs with `weights_only=True` only, and with sparse invariant checking on;
* the result must be one dense, strided, contiguous CPU tensor of a floating dtype, refused before anything reads
  its values, so a sparse tensor is never densified.
"""
from __future__ import annotations

import base64
import binascii
import io
import zipfile

import torch

__all__ = ["decode_prompt_embeds", "encode_prompt_embeds", "validate_prompt_embeds"]

DEFAULT_MAX_BYTES = 64 << 20
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ZIP_MAGIC = b"PK\x03\x04"


def encode_prompt_embeds(tensor: torch.Tensor) -> str:
    """The client side: base64 of `torch.save(tensor)`, the form `decode_prompt_embeds` takes."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a torch.Tensor, got {type(tensor).__name__}.")
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_prompt_embeds(data: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Base64 of a `torch.save`d tensor (str, or the same ASCII as bytes) -> a dense [L, H] floating CPU tensor.

    A [1, L, H] tensor is squeezed to [L, H]. Anything else (too large, not base64, not a tensor file, code in
    the pickle, a container of tensors, a sparse or non-contiguous tensor, an integer dtype, NaN/Inf, the wrong
    rank, no rows) raises ValueError saying what was wrong.
    """
    raw = _b64decode_bounded(data, max_bytes)
    tensor = _load_tensor(raw, max_bytes)
    tensor = _check_tensor(tensor, require_contiguous=True, require_cpu=True)
    _check_finite(tensor)
    return tensor.detach().resolve_neg().resolve_conj().clone(memory_format=torch.contiguous_format)


def validate_prompt_embeds(tensor, hidden_size: int, max_model_len: int, dtype: torch.dtype,
                           device: torch.device | str) -> torch.Tensor:
    """The engine-side checks, for the HTTP and the offline API alike: a dense floating tensor of shape [L, H]
    (or [1, L, H], squeezed) with H == hidden_size, 0 < L <= max_model_len and finite values (also after the cast).
    Returns it as `dtype` on `device`, contiguous."""
    tensor = _check_tensor(tensor, require_contiguous=False, require_cpu=False)
    length, hidden = tensor.shape
    if hidden != hidden_size:
        raise ValueError(f"prompt_embeds has hidden size {hidden}, but the model's hidden size is {hidden_size}.")
    if length > max_model_len:
        raise ValueError(f"prompt_embeds (length {length}) is longer than the maximum model length of "
                         f"{max_model_len}.")
    cast = tensor.detach().to(device=device, dtype=dtype).resolve_neg().resolve_conj().contiguous()
    if not bool(torch.isfinite(cast).all()):
        _check_finite(tensor)  # NaN/Inf in what was given: say so
        raise ValueError(f"prompt_embeds holds values too large for {dtype} (they become Inf when cast); "
                         f"its largest magnitude is {tensor.abs().max().item():g}, {dtype}'s limit is "
                         f"{torch.finfo(dtype).max:g}.")
    return cast


# --- shared checks -------------------------------------------------------------------------------------------------

def _check_tensor(tensor, *, require_contiguous: bool, require_cpu: bool) -> torch.Tensor:
    """Structure only (no values are read): one dense strided floating tensor of rank 2, or rank 3 with a leading
    dim of 1 (returned squeezed to rank 2), with at least one row and a non-zero hidden size."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a single torch.Tensor, got {type(tensor).__name__}.")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise ValueError(f"prompt_embeds must be a plain torch.Tensor, got the subclass {type(tensor).__name__}.")
    if (tensor.layout is not torch.strided or tensor.is_sparse or tensor.is_mkldnn or tensor.is_nested
            or tensor.is_quantized):
        raise ValueError(f"prompt_embeds must be a dense (strided) tensor, got layout {tensor.layout}"
                         f"{' (nested)' if tensor.is_nested else ''}{' (quantized)' if tensor.is_quantized else ''}.")
    if require_cpu and tensor.device.type != "cpu":
        raise ValueError(f"prompt_embeds must hold its data on the CPU, got device {tensor.device}.")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"prompt_embeds must have a floating dtype (float32, float16, bfloat16 or float64), got "
                         f"{tensor.dtype}.")
    shape = tuple(tensor.shape)
    if tensor.dim() == 3 and shape[0] == 1:
        tensor = tensor[0]
    elif tensor.dim() != 2:
        raise ValueError(f"prompt_embeds must have shape [sequence_length, hidden_size] (or [1, sequence_length, "
                         f"hidden_size]), got {tensor.dim()} dimension(s) {list(shape)}.")
    if tensor.shape[0] == 0:
        raise ValueError(f"prompt_embeds is empty (shape {list(shape)}): it needs at least one embedding.")
    if tensor.shape[1] == 0:
        raise ValueError(f"prompt_embeds has hidden size 0 (shape {list(shape)}).")
    if require_contiguous and not tensor.is_contiguous():
        raise ValueError(f"prompt_embeds must be contiguous, got shape {list(shape)} with strides "
                         f"{list(tensor.stride())}.")
    return tensor


def _check_finite(tensor: torch.Tensor) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"prompt_embeds contains {bad} NaN or Inf value(s); all values must be finite.")


# --- decoding ------------------------------------------------------------------------------------------------------

def _b64decode_bounded(data, max_bytes: int) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, (str, bytes)):
        raise ValueError(f"prompt_embeds must be a base64 string, got {type(data).__name__}.")
    if not data:
        raise ValueError("prompt_embeds is an empty string.")
    # base64 of max_bytes bytes is 4 * ceil(max_bytes / 3) characters; refuse longer input before decoding it.
    max_chars = 4 * ((max_bytes + 2) // 3)
    if len(data) > max_chars:
        raise ValueError(f"prompt_embeds is too large: {len(data)} base64 characters decode to about "
                         f"{len(data) // 4 * 3} bytes, over the limit of {max_bytes} bytes.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"prompt_embeds is not valid base64 (standard alphabet, padded, no whitespace): "
                         f"{e}.") from None
    if len(raw) > max_bytes:
        raise ValueError(f"prompt_embeds is too large: {len(raw)} bytes, over the limit of {max_bytes} bytes.")
    return raw


def _load_tensor(raw: bytes, max_bytes: int):
    """`torch.load` of a zip-format `torch.save` file with `weights_only=True`; every failure is a ValueError."""
    _check_archive(raw, max_bytes)
    try:
        with torch.sparse.check_sparse_tensor_invariants(True):
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, KeyError, ...: all are "not a tensor file"
        raise ValueError(f"prompt_embeds could not be decoded as a tensor: {_summarize(e)}") from None


def _check_archive(raw: bytes, max_bytes: int) -> None:
    if not raw.startswith(_ZIP_MAGIC):
        raise ValueError("prompt_embeds could not be decoded as a tensor: it is not a torch.save zip archive "
                         "(raw pickles and the legacy torch.save format are not accepted).")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise ValueError(f"prompt_embeds could not be decoded as a tensor: not a readable zip archive "
                         f"({e}).") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"prompt_embeds could not be decoded as a tensor: archive record {entry.filename!r} "
                             f"is compressed; torch.save writes stored (uncompressed) records only.")
    total = sum(entry.file_size for entry in entries)
    if total > max_bytes:
        raise ValueError(f"prompt_embeds is too large: its archive declares {total} bytes, over the limit of "
                         f"{max_bytes} bytes.")


def _summarize(error: Exception) -> str:
    """One line for the client: drop torch's advice to retry with weights_only=False and its doc pointers."""
    paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    useful = [p for p in paragraphs if "weights_only" not in p and not p.startswith("Check the documentation")]
    text = " ".join((useful or paragraphs or [""])[0].split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
