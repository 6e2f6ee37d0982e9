import pytest

from robnet_svc.atomic import atomic_path


def test_completed_block_renames_onto_the_target(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"done")
        assert not target.exists()  # nothing under the final name until the block completes
    assert target.read_bytes() == b"done"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failing_block_leaves_nothing_and_keeps_an_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
