"""safe_extract_tar: regular files land under the target; anything that could escape refuses the tar."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from xmm_pipeline.archive.download import safe_extract_tar
from xmm_pipeline.errors import ProductError


def _tar(members: list[tuple[str, bytes | None, bytes]], compression: str = "") -> bytes:
    """members: (name, data or None, type flag); returns the tar's bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "../../etc/passwd"
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def test_regular_members_are_extracted(tmp_path: Path) -> None:
    data = _tar([("0123456789/pps", None, tarfile.DIRTYPE),
                 ("0123456789/pps/a.FTZ", b"alpha", tarfile.REGTYPE),
                 ("0123456789/pps/b.FTZ", b"beta", tarfile.REGTYPE)], compression="gz")
    archive = tmp_path / "obs.tar.gz"
    archive.write_bytes(data)
    dest = tmp_path / "dest"
    written = safe_extract_tar(archive, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == ["0123456789/pps/a.FTZ",
                                                                      "0123456789/pps/b.FTZ"]
    assert (dest / "0123456789/pps/b.FTZ").read_bytes() == b"beta"


def test_select_and_file_object(tmp_path: Path) -> None:
    data = _tar([("x/keep.FTZ", b"1", tarfile.REGTYPE), ("x/skip.PDF", b"2", tarfile.REGTYPE)])
    written = safe_extract_tar(io.BytesIO(data), tmp_path, select=lambda name: name.endswith(".FTZ"))
    assert [p.name for p in written] == ["keep.FTZ"]
    assert not (tmp_path / "x/skip.PDF").exists()


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        ("../escaped.FTZ", tarfile.REGTYPE, "parent-directory"),
        ("ok/../../escaped.FTZ", tarfile.REGTYPE, "parent-directory"),
        ("/tmp/absolute.FTZ", tarfile.REGTYPE, "absolute path"),
        ("C:/windows.FTZ", tarfile.REGTYPE, "absolute path"),
        ("ok/link.FTZ", tarfile.SYMTYPE, "link"),
        ("ok/hard.FTZ", tarfile.LNKTYPE, "link"),
        ("ok/null", tarfile.CHRTYPE, "device"),
        ("ok/disk", tarfile.BLKTYPE, "device"),
        ("ok/pipe", tarfile.FIFOTYPE, "device or fifo"),
    ],
)
def test_unsafe_member_refuses_whole_tar(tmp_path: Path, name: str, kind: bytes, reason: str) -> None:
    data = _tar([("ok/first.FTZ", b"first", tarfile.REGTYPE), (name, b"evil" if kind == tarfile.REGTYPE
                                                              else None, kind)])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ProductError, match=reason) as error:
        safe_extract_tar(io.BytesIO(data), dest)
    assert repr(name) in str(error.value)
    assert not any(dest.rglob("*")), "nothing may be written when a tar is refused"
    assert not (tmp_path / "escaped.FTZ").exists()


def test_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ProductError, match="not a readable tar"):
        safe_extract_tar(tmp_path / "junk.tar", tmp_path / "dest")


def test_truncated_tar(tmp_path: Path) -> None:
    data = _tar([("x/a.FTZ", b"a" * 20000, tarfile.REGTYPE)], compression="gz")
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProductError):
        safe_extract_tar(tmp_path / "cut.tar.gz", tmp_path / "dest")
    assert not list((tmp_path / "dest").rglob("*.FTZ")) if (tmp_path / "dest").exists() else True
