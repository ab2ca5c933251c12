"""The converter's file I/O: direct-I/O output files, reused buffers, safetensors and DCP files
as other readers (safetensors, torch.load, DCP) see them, and checksums taken while writing."""
import errno
import os
import zipfile

import numpy as np
import pytest
import torch
import xxhash

from megatron_biomed.checkpoint import manifest as MF
from megatron_biomed.convert import storage as S


def _pieces():
    """Writes of every kind: unaligned bytes, an aligned buffer at an unaligned offset, aligned
    buffers at aligned offsets (with and without a partial last block), tensors, numpy arrays."""
    rng = np.random.default_rng(0)
    aligned = S.aligned_empty(3 * S.OutputFile.ALIGN)
    aligned[:] = rng.integers(0, 256, aligned.nbytes, dtype=np.uint8)
    ragged = S.aligned_empty(2 * S.OutputFile.ALIGN + 5)
    ragged[:] = rng.integers(0, 256, ragged.nbytes, dtype=np.uint8)
    return [b"header", aligned, rng.integers(0, 256, 4096 - 6 + 4096 * 2 - 3, dtype=np.uint8), aligned,
            torch.arange(7000, dtype=torch.int16), ragged, b"", rng.integers(0, 256, 50_000, dtype=np.uint8),
            torch.randn(4096, dtype=torch.float32)]


def _bytes(pieces):
    out = b""
    for p in pieces:
        out += p.numpy().tobytes() if isinstance(p, torch.Tensor) else bytes(p)
    return out


def _write(path, pieces, staging=3 * 4096):
    with S.OutputFile(str(path), staging=staging) as f:
        for p in pieces:
            f.write(p)
    return f


def _takes_o_direct(directory):
    try:
        os.close(os.open(str(directory / "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(directory / "probe"):
            os.remove(directory / "probe")


def test_output_file_writes_exactly_the_bytes_given(tmp_path):
    pieces = _pieces()
    f = _write(tmp_path / "out", pieces)
    assert (tmp_path / "out").read_bytes() == _bytes(pieces) and f.size == len(_bytes(pieces))
    assert f.direct == _takes_o_direct(tmp_path)  # direct wherever the file system takes it


def test_output_file_without_direct_io(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT at open, or a write it does not take (EINVAL): the
    same bytes, written through the page cache."""
    real_open, real_write = os.open, os.write

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)
    pieces = _pieces()
    monkeypatch.setattr(os, "open", refusing_open)
    f = _write(tmp_path / "refused_at_open", pieces)
    assert not f.direct and (tmp_path / "refused_at_open").read_bytes() == _bytes(pieces)
    monkeypatch.setattr(os, "open", real_open)

    calls = {"n": 0}

    def refusing_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:  # after a direct write has gone through
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", refusing_write)
    f = _write(tmp_path / "refused_later", pieces, staging=4096)
    assert calls["n"] > 2 and not f.direct
    assert (tmp_path / "refused_later").read_bytes() == _bytes(pieces)


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        _write(tmp_path / "out", _pieces())


def test_buffers_are_reused_only_when_handed_back():
    with S.reused_buffers():
        a, _ = S.empty_buffer((1024, 1024), torch.bfloat16)
        b, _ = S.empty_buffer((1024, 1024), torch.bfloat16)
        assert a.data_ptr() % S.OutputFile.ALIGN == 0 and a.data_ptr() != b.data_ptr()
        ptr = a.data_ptr()
        S.recycle(a)
        c, view = S.empty_buffer((2048, 512), torch.float16)  # same bytes, any shape and dtype
        assert c.data_ptr() == ptr and view.dtype == np.int16 and c.shape == (2048, 512)
        d, _ = S.empty_buffer((1024, 1024), torch.bfloat16)  # b was not handed back, c is in use
        assert d.data_ptr() not in (ptr, b.data_ptr())
        small, _ = S.empty_buffer((10, 10), torch.float32)  # under 1 MB: never pooled
        S.recycle(small)
        assert S.empty_buffer((10, 10), torch.float32)[0].data_ptr() != small.data_ptr()


def test_safetensors_written_for_direct_io_read_by_safetensors(tmp_path):
    from safetensors.torch import load_file
    tensors = {"small.bias": torch.randn(5, dtype=torch.bfloat16), "big": torch.randn(4096, 3).to(torch.bfloat16),
               "odd": torch.randn(7, 11), "aligned.fp32": torch.randn(2048, 2), "int": torch.arange(3)}
    items = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    path = str(tmp_path / "model.safetensors")
    S.write_safetensors(path, items, lambda n: tensors[n].clone())
    loaded = load_file(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    header = S.read_safetensors_header(path)
    data_start = min(begin for _, _, begin, _ in header.values())
    assert data_start % 4096 == 0  # the header is padded with spaces up to the data
    for name in ("big", "aligned.fp32"):  # whole 4 KB blocks come first, so they start aligned
        assert header[name][2] % 4096 == 0, name
    assert os.path.getsize(path) == max(end for *_, end in header.values())


def test_dcp_files_align_tensors_and_their_checksums_are_taken_while_writing(tmp_path):
    specs = {"a": ((3000, 7), torch.bfloat16), "b": ((1024, 1024), torch.float32), "c": ((), torch.int64)}
    values = {"a": torch.randn(3000, 7).to(torch.bfloat16), "b": torch.randn(1024, 1024), "c": torch.tensor(5)}
    crc, alignment = torch.serialization.get_crc32_options(), S.serialization_config.save.storage_alignment
    written = S.write_dcp(str(tmp_path), specs, lambda k: values[k].clone())
    # torch's own settings are as they were
    assert torch.serialization.get_crc32_options() == crc
    assert S.serialization_config.save.storage_alignment == alignment
    assert set(written) == set(os.listdir(tmp_path)) and ".metadata" in written
    assert written == MF.file_entries(str(tmp_path), written)  # hashed as written == hashed from disk
    reader = S.DCPReader(str(tmp_path))
    for key, value in values.items():
        assert torch.equal(reader.read(key), value), key
        copied = torch.empty_like(value)
        reader.read_into({key: copied})
        assert torch.equal(copied, value), key
    for info in reader.metadata.storage_data.values():  # each tensor's data on a 4 KB boundary
        with zipfile.ZipFile(tmp_path / info.relative_path) as z:
            record = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        with open(tmp_path / info.relative_path, "rb") as f:
            f.seek(record.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        assert (record.header_offset + 30 + name_len + extra_len) % 4096 == 0


def test_stream_file_hashes_every_byte_in_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(MF, "_CHUNK", 2 * 4096)
    for size in (0, 1, 8192, 8193, 50_001):
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        (tmp_path / "f").write_bytes(data)
        assert MF.hash_file(str(tmp_path / "f")) == xxhash.xxh3_128(data).hexdigest(), size
