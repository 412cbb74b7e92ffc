"""Archives Tuneforge unpacks (adapters for serving, resume states) hold only regular files and folders.

Each archive here is built for real with tarfile, as a hostile or corrupted artifact would be, and
unpacked with `unpack_once`: every member is checked before the first is written.
"""

import io
import os
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.errors import ApiError
from app.storage import unpack_once

_written: list[str] | None = None  # while recording: every path opened for writing


def _audit(event: str, args: tuple) -> None:
    if event != "open" or _written is None:
        return
    path, mode, flags = args
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR)
    if writes:
        _written.append(str(path))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside `files_written`


@contextmanager
def files_written() -> Iterator[list[str]]:
    """The paths this process opens for writing inside the block (Python's audit events see them all)."""
    global _written
    _written = []
    try:
        yield _written
    finally:
        _written = None


def _file(name: str, data: bytes = b"{}") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


# Each of these is accepted by tarfile's own "data" filter, or refused by it only mid-extraction.
BAD_MEMBERS = {
    "symlink inside the folder": (_special("tokenizer.json", tarfile.SYMTYPE, "adapter_config.json"), "link"),
    "symlink out of it": (_special("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    "hard link": (_special("copy.json", tarfile.LNKTYPE, "adapter_config.json"), "hard link"),
    "character device": (_special("zero", tarfile.CHRTYPE), "device"),
    "block device": (_special("disk", tarfile.BLKTYPE), "device"),
    "FIFO": (_special("pipe", tarfile.FIFOTYPE), "FIFO"),
}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
@pytest.mark.parametrize("position", ["first", "last"])
def test_an_archive_with_anything_but_files_and_folders_is_refused_before_extraction(
    tmp_path: Path, case: str, position: str
) -> None:
    bad, words = BAD_MEMBERS[case]
    good = [_file("adapter_config.json"), _special("sub", tarfile.DIRTYPE), _file("sub/weights.bin", b"w")]
    members = [bad, *good] if position == "first" else [*good, bad]
    archive = _archive(tmp_path / "adapter.tar.gz", members)
    cache = tmp_path / "cache"
    with files_written() as written, pytest.raises(Exception) as refused:
        unpack_once(archive, cache / "ft-model", model_id="ft:tiny:x:ftjob-1")
    assert written == [], "no member was written before the bad one was found"
    assert isinstance(refused.value, ApiError), refused.value
    assert refused.value.status == 500 and refused.value.type == "server_error"
    assert repr(bad[0].name) in refused.value.message and words in refused.value.message
    assert "only regular files and folders" in refused.value.message
    assert list(cache.iterdir()) == [], "nothing was extracted, not even into a temp folder"


def test_a_plain_resume_state_with_a_link_last_extracts_nothing(tmp_path: Path) -> None:
    """Resume states are plain tars (worker/training/resume.py): the same check, on a thousand members."""
    members = [_file(f"part-{i}.bin", b"x" * 100) for i in range(1000)]
    members.append(_special("rng_state.pth", tarfile.SYMTYPE, "part-0.bin"))
    archive = _archive(tmp_path / "step-4.state.tar", members, mode="w")
    with files_written() as written, pytest.raises(Exception) as refused:
        unpack_once(archive, tmp_path / "resume" / "state", model_id="ftjob-1")
    assert written == []
    assert isinstance(refused.value, ApiError) and "'rng_state.pth'" in refused.value.message
    assert list((tmp_path / "resume").iterdir()) == []


def test_files_and_folders_unpack(tmp_path: Path) -> None:
    archive = _archive(
        tmp_path / "adapter.tar.gz",
        [
            _file("adapter_config.json", b'{"r": 8}'),
            _special("sub", tarfile.DIRTYPE),
            _file("sub/w.bin", b"w"),
        ],
    )
    with files_written() as written:
        folder = unpack_once(archive, tmp_path / "cache" / "ft-model", model_id="ft:tiny:x:ftjob-1")
    assert len(written) == 2, "the recorder sees extraction"
    assert (folder / "adapter_config.json").read_bytes() == b'{"r": 8}'
    assert (folder / "sub" / "w.bin").read_bytes() == b"w"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["ft-model"]


def test_unsafe_paths_are_still_refused(tmp_path: Path) -> None:
    for name in ("/etc/cron.d/x", "../outside.json", "sub/../../outside.json"):
        archive = _archive(tmp_path / "adapter.tar.gz", [_file("a.json"), _file(name)])
        with pytest.raises(ApiError, match="unsafe path"):
            unpack_once(archive, tmp_path / "cache" / "ft-model", model_id="m")
    assert not (tmp_path / "outside.json").exists()
