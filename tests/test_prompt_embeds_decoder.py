"""prompt_embeds over HTTP is base64 of a torch.save'd tensor: untrusted bytes for torch.load (CVE-2025-62164).
Only one dense, contiguous, finite floating [L, H] tensor gets through; everything else is a ValueError."""
from __future__ import annotations

import base64
import io
import os
import pickle
import uuid
import zipfile

import pytest
import torch

from shardserve.entrypoints.prompt_embeds import (
    _load_tensor,
    decode_prompt_embeds,
    encode_prompt_embeds,
    validate_prompt_embeds,
)


def _saved_b64(obj, **kwargs) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- round trips -----------------------------------------------------------------------------------------------------

def test_round_trip_float32():
    t = torch.randn(5, 8)
    out = decode_prompt_embeds(encode_prompt_embeds(t))
    assert out.dtype == torch.float32 and out.shape == (5, 8)
    assert torch.equal(out, t)
    assert out.is_contiguous() and not out.requires_grad


def test_round_trip_bf16_batched_is_squeezed():
    t = torch.randn(1, 5, 8).to(torch.bfloat16)
    out = decode_prompt_embeds(encode_prompt_embeds(t))
    assert out.dtype == torch.bfloat16 and out.shape == (5, 8)
    assert torch.equal(out, t[0])


def test_accepts_bytes_and_result_is_a_copy():
    t = torch.randn(3, 4, requires_grad=True)
    data = _saved_b64(t).encode("ascii")
    out = decode_prompt_embeds(data)
    assert torch.equal(out, t.detach()) and not out.requires_grad
    assert type(out) is torch.Tensor


# --- malicious pickles -----------------------------------------------------------------------------------------------

def _marker(tmp_path) -> str:
    return str(tmp_path / f"pwned-{uuid.uuid4().hex}")


class _SystemPayload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _OpenPayload:
    """Writes the marker without a shell: builtins.open(path, 'w')."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("payload_cls", [_SystemPayload, _OpenPayload])
def test_malicious_pickle_in_torch_save_zip_is_refused(tmp_path, payload_cls):
    path = _marker(tmp_path)
    data = _saved_b64(payload_cls(path))
    with pytest.raises(ValueError, match="could not be decoded as a tensor") as info:
        decode_prompt_embeds(data)
    assert not os.path.exists(path)
    # torch's weights_only unpickler is what stopped it, and its advice to retry unsafely is not passed on
    assert "weights_only" not in str(info.value)
    assert "UnpicklingError" in str(info.value)


def test_malicious_tensor_wrapped_in_payload_is_refused(tmp_path):
    path = _marker(tmp_path)
    data = _saved_b64({"x": torch.randn(2, 2), "y": _SystemPayload(path)})
    with pytest.raises(ValueError, match="could not be decoded"):
        decode_prompt_embeds(data)
    assert not os.path.exists(path)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_raw_pickle_is_refused(tmp_path, protocol):
    path = _marker(tmp_path)
    data = base64.b64encode(pickle.dumps(_SystemPayload(path), protocol=protocol)).decode()
    with pytest.raises(ValueError, match="could not be decoded as a tensor"):
        decode_prompt_embeds(data)
    assert not os.path.exists(path)


def test_malicious_raw_pickle_in_hand_made_zip_is_refused_by_torch_load(tmp_path):
    """A zip (not written by torch.save) whose data.pkl is plain pickle.dumps of the payload: it gets past the
    format check and reaches torch.load(weights_only=True), which must refuse it."""
    path = _marker(tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_SystemPayload(path), protocol=2))
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    data = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(ValueError, match="could not be decoded as a tensor: UnpicklingError"):
        decode_prompt_embeds(data)
    assert not os.path.exists(path)


def test_torch_load_layer_alone_refuses_payload(tmp_path):
    """Below the format check: _load_tensor itself (weights_only=True) refuses the payload."""
    path = _marker(tmp_path)
    buffer = io.BytesIO()
    torch.save(_SystemPayload(path), buffer)
    with pytest.raises(ValueError, match="UnpicklingError"):
        _load_tensor(buffer.getvalue(), 1 << 20)
    assert not os.path.exists(path)


def test_legacy_torch_save_format_is_refused(tmp_path):
    path = _marker(tmp_path)
    with pytest.raises(ValueError, match="legacy"):
        decode_prompt_embeds(_saved_b64(_SystemPayload(path), _use_new_zipfile_serialization=False))
    with pytest.raises(ValueError, match="legacy"):
        decode_prompt_embeds(_saved_b64(torch.randn(2, 4), _use_new_zipfile_serialization=False))
    assert not os.path.exists(path)


def test_deflated_archive_is_refused():
    """torch's zip reader inflates deflated records, so a small request could expand to a huge one."""
    raw = base64.b64decode(_saved_b64(torch.zeros(64, 64)))
    source = zipfile.ZipFile(io.BytesIO(raw))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in source.infolist():
            archive.writestr(entry.filename, source.read(entry.filename))
    with pytest.raises(ValueError, match="compressed"):
        decode_prompt_embeds(base64.b64encode(buffer.getvalue()).decode())


# --- sparse and other layouts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda d: d.to_sparse(),
    lambda d: d.to_sparse_csr(),
    lambda d: d.to_sparse_csc(),
    lambda d: d.to_sparse_bsr((2, 2)),
    lambda d: d.to_sparse_bsc((2, 2)),
], ids=["coo", "csr", "csc", "bsr", "bsc"])
@pytest.mark.filterwarnings("ignore:Sparse .* support is in beta state")
def test_sparse_layouts_are_refused(make):
    """torch.load(weights_only=True) rebuilds every sparse layout (they are on its allowlist); the decoder must
    refuse them before anything reads or densifies them."""
    data = _saved_b64(make(torch.randn(4, 8)))
    with pytest.raises(ValueError, match="dense"):
        decode_prompt_embeds(data)


def test_crafted_out_of_bounds_sparse_coo_is_refused_without_densifying():
    """The CVE-2025-62164 shape: a COO tensor whose indices point far outside its size. With invariant checks
    on during load it fails inside torch.load; either way it is a ValueError and nothing is densified."""
    indices = torch.tensor([[0, 1_000_000], [0, 3]])
    values = torch.tensor([1.0, 2.0])
    evil = torch.sparse_coo_tensor(indices, values, (4, 8), check_invariants=False)
    with pytest.raises(ValueError, match="could not be decoded as a tensor: RuntimeError: size is inconsistent"):
        decode_prompt_embeds(_saved_b64(evil))
    assert not torch.sparse.check_sparse_tensor_invariants.is_enabled()  # the global flag is restored


def test_non_contiguous_is_refused():
    t = torch.randn(8, 5).t()
    assert not t.is_contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        decode_prompt_embeds(_saved_b64(t))


def test_expanded_zero_stride_is_refused():
    t = torch.randn(1, 8).expand(100_000, 8)
    with pytest.raises(ValueError, match="contiguous"):
        decode_prompt_embeds(_saved_b64(t))


def test_meta_tensor_is_refused():
    # map_location="cpu" leaves meta tensors on meta
    with pytest.raises(ValueError, match="CPU"):
        decode_prompt_embeds(_saved_b64(torch.empty(2, 8, device="meta")))


# --- dtypes, values, shapes, containers ------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [torch.arange(40).reshape(5, 8), torch.ones(5, 8, dtype=torch.bool),
                               torch.zeros(5, 8, dtype=torch.complex64), torch.zeros(5, 8, dtype=torch.uint8)],
                         ids=["int64", "bool", "complex64", "uint8"])
def test_non_floating_dtypes_are_refused(t):
    with pytest.raises(ValueError, match="floating dtype"):
        decode_prompt_embeds(_saved_b64(t))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    t = torch.randn(5, 8)
    t[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        decode_prompt_embeds(_saved_b64(t))


@pytest.mark.parametrize("obj", [{"x": torch.randn(2, 4)}, [torch.randn(2, 4)], (torch.randn(2, 4),),
                                 [torch.randn(2, 4), torch.randn(2, 4)], {"a": [torch.randn(2, 4)]}, 3.0],
                         ids=["dict", "list", "tuple", "list2", "nested", "float"])
def test_containers_and_non_tensors_are_refused(obj):
    with pytest.raises(ValueError, match="single torch.Tensor"):
        decode_prompt_embeds(_saved_b64(obj))


@pytest.mark.parametrize("shape", [(8,), (1, 2, 3, 8), (2, 5, 8), ()], ids=["rank1", "rank4", "rank3-batch2",
                                                                             "rank0"])
def test_wrong_rank_is_refused(shape):
    with pytest.raises(ValueError, match="dimension"):
        decode_prompt_embeds(_saved_b64(torch.randn(shape)))


@pytest.mark.parametrize("shape", [(0, 8), (1, 0, 8)])
def test_empty_is_refused(shape):
    with pytest.raises(ValueError, match="empty"):
        decode_prompt_embeds(_saved_b64(torch.randn(shape)))


def test_zero_hidden_size_is_refused():
    with pytest.raises(ValueError, match="hidden size 0"):
        decode_prompt_embeds(_saved_b64(torch.randn(4, 0)))


# --- size and encoding -----------------------------------------------------------------------------------------------

def test_oversize_is_refused_before_decoding(monkeypatch):
    data = encode_prompt_embeds(torch.randn(64, 64))  # ~16 KiB of floats

    def no_decode(*args, **kwargs):
        raise AssertionError("base64 was decoded although the input is over the limit")

    monkeypatch.setattr(base64, "b64decode", no_decode)
    with pytest.raises(ValueError, match="too large"):
        decode_prompt_embeds(data, max_bytes=1024)
    # a huge string is refused on its length alone
    with pytest.raises(ValueError, match="too large"):
        decode_prompt_embeds("A" * (4 * 1024 + 4), max_bytes=3 * 1024)


def test_limit_is_exact_after_decoding():
    data = encode_prompt_embeds(torch.randn(4, 8))
    size = len(base64.b64decode(data))
    assert decode_prompt_embeds(data, max_bytes=size).shape == (4, 8)
    with pytest.raises(ValueError, match="too large"):
        decode_prompt_embeds(data, max_bytes=size - 1)


@pytest.mark.parametrize("data", ["not base64!!", "abc", "QUJD\nREVG", encode_prompt_embeds(torch.randn(2, 2))
                                  .replace("+", "-").replace("/", "_") + "-_", "é" * 8, ""],
                         ids=["punct", "unpadded", "newline", "urlsafe", "non-ascii", "empty"])
def test_invalid_base64_is_refused(data):
    with pytest.raises(ValueError, match="base64|empty"):
        decode_prompt_embeds(data)


def test_non_string_input_is_refused():
    with pytest.raises(ValueError, match="base64 string"):
        decode_prompt_embeds(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"hello world, not a tensor", os.urandom(256), b"PK\x03\x04" + os.urandom(200),
                                 b"\x80\x02"], ids=["text", "random", "zip-magic-garbage", "truncated-pickle"])
def test_garbage_bytes_are_refused(raw):
    with pytest.raises(ValueError, match="could not be decoded as a tensor"):
        decode_prompt_embeds(base64.b64encode(raw).decode())


def test_truncated_archive_is_refused():
    raw = base64.b64decode(encode_prompt_embeds(torch.randn(16, 16)))
    with pytest.raises(ValueError, match="could not be decoded as a tensor"):
        decode_prompt_embeds(base64.b64encode(raw[: len(raw) // 2]).decode())


# --- validate_prompt_embeds ------------------------------------------------------------------------------------------

def test_validate_wrong_hidden_size():
    with pytest.raises(ValueError, match=r"prompt_embeds has hidden size 32, but the model's hidden size is 64\."):
        validate_prompt_embeds(torch.randn(5, 32), hidden_size=64, max_model_len=256, dtype=torch.float32,
                               device="cpu")


def test_validate_too_long():
    with pytest.raises(ValueError, match=r"prompt_embeds \(length 300\) is longer than the maximum model length "
                                         r"of 256\."):
        validate_prompt_embeds(torch.randn(300, 64), hidden_size=64, max_model_len=256, dtype=torch.float32,
                               device="cpu")


def test_validate_casts_to_float16():
    t = torch.randn(5, 64)
    out = validate_prompt_embeds(t, hidden_size=64, max_model_len=256, dtype=torch.float16, device="cpu")
    assert out.dtype == torch.float16 and out.device.type == "cpu" and out.is_contiguous()
    assert torch.allclose(out.float(), t, atol=1e-2)


def test_validate_squeezes_batched_and_makes_contiguous():
    t = torch.randn(1, 64, 7).transpose(1, 2)  # [1, 7, 64], non-contiguous: fine offline, made contiguous
    out = validate_prompt_embeds(t, hidden_size=64, max_model_len=256, dtype=torch.bfloat16, device="cpu")
    assert out.shape == (7, 64) and out.is_contiguous() and out.dtype == torch.bfloat16


def test_validate_reuses_structural_checks():
    common = dict(hidden_size=8, max_model_len=16, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="single torch.Tensor"):
        validate_prompt_embeds([[0.0] * 8], **common)
    with pytest.raises(ValueError, match="dense"):
        validate_prompt_embeds(torch.randn(4, 8).to_sparse(), **common)
    with pytest.raises(ValueError, match="floating dtype"):
        validate_prompt_embeds(torch.ones(4, 8, dtype=torch.int64), **common)
    with pytest.raises(ValueError, match="dimension"):
        validate_prompt_embeds(torch.randn(2, 4, 8), **common)
    with pytest.raises(ValueError, match="empty"):
        validate_prompt_embeds(torch.randn(0, 8), **common)
    t = torch.randn(4, 8)
    t[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_prompt_embeds(t, **common)


def test_validate_overflow_on_cast_is_refused():
    t = torch.full((2, 8), 1e6)
    with pytest.raises(ValueError, match="too large for torch.float16"):
        validate_prompt_embeds(t, hidden_size=8, max_model_len=16, dtype=torch.float16, device="cpu")


def test_validate_accepts_decoded_tensor():
    t = decode_prompt_embeds(encode_prompt_embeds(torch.randn(1, 6, 16)))
    out = validate_prompt_embeds(t, hidden_size=16, max_model_len=6, dtype=torch.float32, device="cpu")
    assert out.shape == (6, 16)
