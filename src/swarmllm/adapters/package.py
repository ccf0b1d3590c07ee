"""An adapter folder as one deterministic byte string, and back.

Packed format (version 1)::

    MAGIC                     b"swarmllm-adapter/1\\n"
    header length             8 bytes, big-endian
    header                    JSON {"files": [[relative/posix/name, size], ...]}, names sorted, compact
    file bytes                each file's content in header order, nothing between them

There are no timestamps, modes or owners, so the same files always pack to the same bytes and the sha256
of the packed bytes names the content wherever it travels (`content_hash`). `unpack` accepts only this
canonical form, so unpacking and packing again gives back the very same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from swarmllm.protocol import AdapterKind

__all__ = [
    "AdapterError",
    "AdapterNotFoundError",
    "AdapterTooLargeError",
    "AdapterUnavailableError",
    "AdapterVerificationError",
    "adapter_kind",
    "content_hash",
    "pack",
    "unpack",
]

MAGIC = b"swarmllm-adapter/1\n"
_HEADER_LEN_BYTES = 8
# A header lists file names only; anything bigger than this is garbage, refused before json parses it.
_MAX_HEADER = 1 << 20

# Marker files that say what a folder is; both files of a kind must be present.
KIND_MARKERS: dict[AdapterKind, tuple[str, str]] = {
    "lora": ("adapter_config.json", "adapter_model.safetensors"),  # the standard peft layout
    "blocks": ("swarmllm_blocks.json", "blocks.safetensors"),  # fine-tuned copies of some model blocks
}


class AdapterError(ValueError):
    """An adapter is malformed, unknown, refused or cannot be fetched; the message says which and why."""


class AdapterNotFoundError(AdapterError):
    """No adapter under that name, hash, folder or repo id."""


class AdapterUnavailableError(AdapterError):
    """An adapter is announced, but no provider could serve it now (unreachable, gone, or timed out)."""


class AdapterVerificationError(AdapterError):
    """Bytes whose sha256 is not the one they were announced or requested under."""


class AdapterTooLargeError(AdapterError):
    """An adapter larger than the caller's limit; refused before it is downloaded or written."""


def adapter_kind(folder: str | os.PathLike[str]) -> AdapterKind:
    """`"lora"` or `"blocks"`, from the marker files in `folder`; AdapterError for anything else."""
    path = Path(folder)
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter folder {path} does not exist")
    found = [kind for kind, markers in KIND_MARKERS.items() if any((path / m).is_file() for m in markers)]
    if len(found) > 1:
        raise AdapterError(f"{path} holds the marker files of both a lora and a blocks adapter")
    if not found:
        expected = "; ".join(f"{kind}: {' + '.join(m)}" for kind, m in KIND_MARKERS.items())
        raise AdapterError(f"{path} is not an adapter folder: expected the files of one kind ({expected})")
    kind = found[0]
    missing = [m for m in KIND_MARKERS[kind] if not (path / m).is_file()]
    if missing:
        raise AdapterError(f"{path} looks like a {kind} adapter but lacks {', '.join(missing)}")
    return kind


def pack(folder: str | os.PathLike[str]) -> bytes:
    """The packed bytes of every regular file under `folder` (symlinked files are read through).

    Hidden files and folders (a leading '.') are left out: hub metadata (`.cache/huggingface`,
    `.gitattributes`), `.git` or `.DS_Store` are not part of an adapter, and would make the hash depend
    on where a copy came from. The whole adapter is held in memory, which the size limits keep small.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AdapterNotFoundError(f"adapter folder {root} does not exist")
    names = sorted(_list_files(root))
    files = [(name, (root / name).read_bytes()) for name in names]
    header = json.dumps({"files": [[name, len(data)] for name, data in files]}, separators=(",", ":")).encode()
    return b"".join([MAGIC, len(header).to_bytes(_HEADER_LEN_BYTES, "big"), header, *(d for _, d in files)])


def content_hash(folder: str | os.PathLike[str]) -> str:
    """sha256 hex of `pack(folder)`: the name of the folder's content in stores, hubs and the swarm."""
    return hashlib.sha256(pack(folder)).hexdigest()


def unpack(data: bytes, dest: str | os.PathLike[str]) -> Path:
    """Write packed `data` into `dest` (which must be missing or empty) and return it.

    Every name is checked before anything is written: absolute names, '..', hidden parts, unsorted or
    duplicate names, and sizes that do not add up to `data` are refused with AdapterError, so a peer's
    bytes can never write outside `dest`.
    """
    files, offset = _parse_header(data)
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterError(f"cannot unpack into {out}: it exists and is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    view = memoryview(data)
    try:
        for name, size in files:
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(view[offset : offset + size])
            offset += size
    except OSError as e:  # e.g. both "a" and "a/b" listed: a file where a folder must go
        raise AdapterError(f"cannot unpack adapter: {e}") from e
    return out


def _list_files(root: Path) -> list[str]:
    names = []
    for dirpath, dirs, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for d in dirs:
            if not d.startswith(".") and Path(dirpath, d).is_symlink():
                # os.walk would silently skip it; an adapter missing files is worse than an error.
                raise AdapterError(f"{Path(dirpath, d)} is a symlinked folder; copy it into the adapter")
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in filenames:
            if f.startswith("."):
                continue
            if not Path(dirpath, f).is_file():
                raise AdapterError(f"{Path(dirpath, f)} is not a regular file")
            names.append((rel_dir / f).as_posix())
    return names


def _parse_header(data: bytes) -> tuple[list[tuple[str, int]], int]:
    """(files, offset of the first file's bytes), or AdapterError if `data` is not canonical packed bytes."""
    if not data.startswith(MAGIC):
        raise AdapterError("not a packed swarmllm adapter (bad magic bytes)")
    start = len(MAGIC) + _HEADER_LEN_BYTES
    header_len = int.from_bytes(data[len(MAGIC) : start], "big")
    if len(data) < start or header_len > min(_MAX_HEADER, len(data) - start):
        raise AdapterError("packed adapter is truncated or its header is too large")
    try:
        entries = json.loads(data[start : start + header_len])["files"]
        files = [(str(name), int(size)) for name, size in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"packed adapter has a malformed header: {e}") from None
    previous = None
    for name, size in files:
        _check_name(name)
        if previous is not None and name <= previous:
            raise AdapterError(f"packed adapter lists {name!r} out of order or twice")
        if size < 0:
            raise AdapterError(f"packed adapter gives {name!r} a negative size")
        previous = name
    offset = start + header_len
    if offset + sum(size for _, size in files) != len(data):
        raise AdapterError("packed adapter's file sizes do not add up to its length")
    return files, offset


def _check_name(name: str) -> None:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or "\\" in name or "\0" in name or ".." in path.parts:
        raise AdapterError(f"refusing file name {name!r} in a packed adapter: it points outside the folder")
    # `pack` never writes hidden or non-normalized names, so any such name is not canonical.
    if path.as_posix() != name or any(part.startswith(".") for part in path.parts):
        raise AdapterError(f"refusing file name {name!r} in a packed adapter: not a canonical name")
