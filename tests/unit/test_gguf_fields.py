"""BulkGGUFReader yields exactly the fields of gguf's own reader, on a file written by gguf's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from swarmllm.models.gguf_fields import BulkGGUFReader


def _write(path: Path) -> None:
    writer = GGUFWriter(path, arch="llama")
    writer.add_array("tokens", ["<s>", "", "héllo", "▁world", "x" * 300])
    writer.add_array("scores", [0.5, -1.25, 3.0])
    writer.add_key_value("types", [1, 2, 3, 6], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    writer.add_key_value("big", [2**40, 7], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT64)
    writer.add_array("flags", [True, False, True])
    writer.add_array("empty", [])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_string("name", "tiny")
    writer.add_float32("eps", 1e-5)
    writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bulk_reader_fields_equal_gguf_readers(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write(path)
    slow, fast = GGUFReader(path), BulkGGUFReader(path)
    assert list(fast.fields) == list(slow.fields)
    for name, field in slow.fields.items():
        mine = fast.fields[name]
        assert (mine.offset, mine.name, mine.data, mine.types) == (field.offset, field.name, field.data, field.types), name
        assert len(mine.parts) == len(field.parts), name
        for a, b in zip(mine.parts, field.parts, strict=True):
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), name
        assert mine.contents() == field.contents(), name
    assert fast.fields["tokens"].contents() == ["<s>", "", "héllo", "▁world", "x" * 300]
    assert [(t.name, t.data.tolist()) for t in fast.tensors] == [(t.name, t.data.tolist()) for t in slow.tensors]
