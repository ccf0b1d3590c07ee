"""A GGUF reader that parses metadata arrays in bulk, for the one-time conversion of a shipped GGUF.

gguf's own reader walks an array one element at a time, through a recursive call and several numpy views
per element: Gemma 3's 262,144-token vocabulary (tokens, scores, token types) took ~35 s to parse. This
reader yields the very same fields (the same parts, data indexes and types, which transformers reads), but
reads a scalar array as one view and splits it into rows, and walks a string array's lengths in a tight
loop. Anything else (nested arrays, tensors) goes through gguf's own code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

# The header of an array value: its item type (uint32) and its length (uint64).
_ARRAY_HEADER = 12


class BulkGGUFReader(GGUFReader):
    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n = GGUFValueType(int(raw_itype[0])), int(alen[0])
        offs = orig_offs + _ARRAY_HEADER
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, n).view(np.ndarray)
            elements, size = list(values.reshape(n, 1)), int(values.nbytes)
            data = list(range(2, 2 + n))
        elif itype == GGUFValueType.STRING:
            elements, data, size = self._strings(offs, n)
        else:
            return super()._get_field_parts(orig_offs, raw_type)
        # As gguf's reader: an empty array's types do not name its item type.
        types = [GGUFValueType.ARRAY, itype] if n else [GGUFValueType.ARRAY]
        return _ARRAY_HEADER + size, [raw_itype, alen, *elements], data, types

    def _strings(self, offs: int, n: int) -> tuple[list[np.ndarray], list[int], int]:
        """`n` strings from `offs`: each is a uint64 length and its bytes, two parts, the bytes being data."""
        length_type = np.dtype(np.uint64).newbyteorder(self.byte_order)
        # Slices of a plain array, not of the memmap: a memmap runs Python code for every slice it makes.
        raw, start = self.data.view(np.ndarray), offs
        parts: list[np.ndarray] = []
        for _ in range(n):
            length = raw[offs : offs + 8].view(length_type)
            end = offs + 8 + int(length[0])
            parts += (length, raw[offs + 8 : end])
            offs = end
        return parts, list(range(3, 3 + 2 * n, 2)), offs - start
