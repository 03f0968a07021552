"""What an install without -e gets: the sdist holds the project (scripts, their data and DeepSpeed configs, docs,
tests), and the wheel built from it every file the package reads beside its code."""

import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from _helpers import ROOT


def _build(kind: str, source, out) -> str:
    """setuptools' PEP 517 hook (what pip and `python -m build` call), run in ``source``: the file it wrote."""
    out.mkdir(exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / r.stdout.split()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist built from the checkout's tracked files (a copy: nothing is written into the checkout), and the
    wheel built from that sdist, as `python -m build` makes them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the tracked files are the source)")
    # the build runs this environment's setuptools (pip would fetch one >= pyproject's build requirement)
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"needs setuptools >= 77 (pyproject's build requirement); this one is {setuptools.__version__}")
    tmp = tmp_path_factory.mktemp("packaging")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tracked = [f for f in files.decode().split("\0") if f and ((ROOT / f).exists() or (ROOT / f).is_symlink())]
    src = tmp / "src"
    for f in tracked:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f, follow_symlinks=False)  # (ds_configs stays a link)
    sdist = _build("sdist", src, tmp / "dist")
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n and not t.getmember(n).isdir()}
        t.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    wheel = _build("wheel", tmp / "unpacked" / top, tmp / "wheel")
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    return tracked, in_sdist, in_wheel


def test_the_wheel_holds_every_file_of_the_package(built):
    """A file read beside the code (the demo's vocabulary, the chat page, `--deepspeed zero2`'s configs) must be in
    the wheel: an install without -e has nothing else. finetune/ds_configs was not (ds_configs/ sat outside the
    package: `--deepspeed` had no config to read where the package was installed from a wheel)."""
    tracked, _, in_wheel = built
    package = {f for f in tracked if f.startswith("finetune/")}
    assert package - in_wheel == set()
    assert {"finetune/ds_configs/zero2.json", "finetune/serve/static/index.html",
            "finetune/assets/qwen_small.tiktoken"} <= in_wheel


def test_the_sdist_holds_the_project(built):
    """The sdist held only the package, README.md and some tests: not the scripts the README runs, their demo data,
    the DeepSpeed configs (ds_configs/ is a link: its files go in), ARCHITECTURE.md or the rest of the tests."""
    tracked, in_sdist, _ = built
    want = {f for f in tracked if not f.startswith(".") and f != "ds_configs"}
    want |= {f"ds_configs/{p.name}" for p in (ROOT / "ds_configs").glob("*.json")}
    assert want - in_sdist == set()
