"""The export transaction (export.publish): --force replaces only what is provably our artifacts
(plain names, sizes, hashes), the lock never takes a user's file, and a failed export leaves
nothing. The graph export itself is replaced by a tiny fake so these cases take milliseconds."""
import hashlib
import json
import os
import pathlib
import shutil

import pytest

from var_ssg.contract.manifest import FORMAT, FORMAT_VERSION, write_manifest
from tests.conftest import TINY
from tests.test_reliability_inputs import cli, one_line_error

MODEL = ["--model", TINY, "--random-init", "0"]


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
            for p in sorted(pathlib.Path(root).rglob("*"))}


@pytest.fixture
def fake_export(monkeypatch):
    """The (slow) graph export replaced by one that writes a tiny artifact set; calls recorded."""
    from var_ssg.export import onnx_export
    calls = []

    def export_into(var, vae, src, tmp, ec, key, progress):
        calls.append(tmp)
        (pathlib.Path(tmp) / "step_all.onnx").write_bytes(b"new graph")
        data = dict(format=FORMAT, format_version=FORMAT_VERSION, cache_key=key, graphs={},
                    external_data=dict(file="weights.bin", bytes=0, parameter_bytes=0, referenced_bytes=0))
        write_manifest(tmp, data)
        return data
    monkeypatch.setattr(onnx_export, "_export_into", export_into)
    return calls


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def hand_made(d, files, listing):
    """A folder with the user's files and a manifest.json that claims them."""
    d.mkdir()
    for name, body in files.items():
        (d / name).write_bytes(body)
    (d / "manifest.json").write_text(json.dumps(dict(format=FORMAT, format_version=FORMAT_VERSION, files=listing)))
    return d


THESIS, BASHRC = b"four years of work\n", b"export PATH\n"


@pytest.mark.parametrize("case,msg", [
    ("empty-entries", "'.bashrc'"),             # the manifest: {"thesis.txt": {}, ".bashrc": {}}
    ("hidden-name", "'.bashrc'"),               # right size and hash, but not a plain artifact name
    ("wrong-size", "'thesis.txt'"),
    ("wrong-hash", "'thesis.txt'"),
])
def test_force_never_deletes_what_a_hand_made_manifest_lists(capsys, tmp_path, fake_export, case, msg):
    files = {"thesis.txt": THESIS, ".bashrc": BASHRC}
    ok = {n: dict(bytes=len(b), sha256=_sha(b)) for n, b in files.items()}
    listing = {"empty-entries": {"thesis.txt": {}, ".bashrc": {}}, "hidden-name": ok,
               "wrong-size": dict(ok, **{"thesis.txt": dict(bytes=3, sha256=_sha(THESIS))}),
               "wrong-hash": dict(ok, **{"thesis.txt": dict(bytes=len(THESIS), sha256="0" * 64)})}[case]
    if case in ("wrong-size", "wrong-hash"):
        del files[".bashrc"], listing[".bashrc"]
    d = hand_made(tmp_path / "art", files, listing)
    before = snapshot(tmp_path)
    line = one_line_error(cli(capsys, "export", *MODEL, "--out", d, "--force"), msg)
    assert "refusing to replace it" in line
    assert snapshot(tmp_path) == before and not fake_export


def test_force_replaces_real_artifacts(tmp_path, fake_export, tiny):
    from var_ssg.export.onnx_export import ExportConfig, export_artifacts
    from var_ssg.graphs.weights import WeightSource
    d = tmp_path / "art"
    d.mkdir()
    (d / "step_all.onnx").write_bytes(b"old graph")
    write_manifest(str(d), dict(format=FORMAT, format_version=FORMAT_VERSION, cache_key="other"))
    export_artifacts(tiny[1], tiny[2], WeightSource(kind="random", seed=0), str(d), ExportConfig(top_k=64), force=True)
    assert (d / "step_all.onnx").read_bytes() == b"new graph" and os.listdir(tmp_path) == ["art"]


def test_a_users_lock_named_file_is_never_taken(capsys, tmp_path, fake_export):
    mine = tmp_path / ".art.lock"
    mine.write_bytes(b"my own lock file\n")
    before = snapshot(tmp_path)
    one_line_error(cli(capsys, "export", *MODEL, "--out", tmp_path / "art"), "is not an export's lock")
    assert snapshot(tmp_path) == before and not fake_export
    mine.unlink()
    mine.symlink_to(tmp_path / "elsewhere")
    one_line_error(cli(capsys, "export", *MODEL, "--out", tmp_path / "art"), "is not an export's lock")
    assert not (tmp_path / "elsewhere").exists() and mine.is_symlink()


def test_a_killed_exports_lock_is_taken_and_removed(capsys, tmp_path, fake_export):
    from var_ssg.export.publish import LOCK_MARK
    (tmp_path / ".art.lock").write_bytes(LOCK_MARK)
    rc, err = cli(capsys, "export", *MODEL, "--out", tmp_path / "art")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["art"]


# ------------------------------------------------------------------------------ --force: only names an export writes
@pytest.fixture
def exported(artifacts):
    """A real var-d2-tiny export (made before fake_export replaces the graph export: list this
    fixture first)."""
    return pathlib.Path(artifacts())


def test_force_never_deletes_a_users_file_a_hand_made_manifest_lists_rightly(capsys, tmp_path, fake_export):
    """A minimal manifest listing the user's file with its right size and sha256 does not make it
    an artifact: no export writes that name."""
    d = hand_made(tmp_path / "art", {"thesis.txt": THESIS}, {"thesis.txt": dict(bytes=len(THESIS), sha256=_sha(THESIS))})
    before = snapshot(tmp_path)
    line = one_line_error(cli(capsys, "export", *MODEL, "--out", d, "--force"), "'thesis.txt', which no export writes")
    assert "refusing to replace it" in line
    assert snapshot(tmp_path) == before and not fake_export


def test_force_never_deletes_a_file_added_to_a_copied_complete_manifest(exported, capsys, tmp_path, fake_export):
    """The issue's probe: a real export's manifest copied beside the user's notes, which it lists
    with their size and a made-up sha256."""
    d = tmp_path / "art"
    d.mkdir()
    notes = b"my notes, not an artifact\n"
    (d / "notes.txt").write_bytes(notes)
    m = json.loads((exported / "manifest.json").read_text())
    m["files"]["notes.txt"] = dict(bytes=len(notes), sha256="0" * 64)
    (d / "manifest.json").write_text(json.dumps(m))
    before = snapshot(tmp_path)
    one_line_error(cli(capsys, "export", *MODEL, "--out", d, "--force"), "'notes.txt', which no export writes")
    assert snapshot(tmp_path) == before and not fake_export


def test_force_verifies_the_sha256_of_a_real_artifacts_files(exported, capsys, tmp_path, fake_export):
    """Under a complete manifest a file of an artifact's name and size whose content differs is
    not deleted (it may be someone's): one line, nothing touched."""
    d = tmp_path / "art"
    shutil.copytree(exported, d)
    body = (d / "scale_consts.npz").read_bytes()
    (d / "scale_consts.npz").write_bytes(b"\0" * len(body))
    before = snapshot(tmp_path)
    one_line_error(cli(capsys, "export", *MODEL, "--out", d, "--force"), "'scale_consts.npz', whose sha256")
    assert snapshot(tmp_path) == before and not fake_export
