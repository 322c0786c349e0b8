"""The gateway image's Python install (helm/gateway.Dockerfile: ``pip install .`` of the folders it copies) holds
every file the code reads, and the app it installs starts and serves its page.

No Docker here: the test builds the wheel the Dockerfile's ``pip install .`` builds, from a copy of exactly the
folders its build stage copies (no ``.git``, so nothing but ``[tool.setuptools.package-data]`` decides what goes
in), installs it into a folder of its own and runs the app from there, outside the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "helm" / "gateway.Dockerfile"
RESULTS = "benchmarks/results/"  # measurements, not read by the code


def _copied() -> list[str]:
    """What the Dockerfile's build stage copies into its source folder (``COPY a b ./`` / ``COPY x ./x``)."""
    build = DOCKERFILE.read_text().split("\nFROM ", 2)[1]  # the first stage: up to the second FROM
    names = []
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", build, re.M):
        names += sources.split()
    assert "pyproject.toml" in names and "gateway" in names, names
    return names


def _isolation() -> list[str]:
    """pip's build in this environment where its setuptools is one pyproject.toml's build-system accepts (no
    download), else in an isolated one (pip fetches it, as ``docker build`` does)."""
    from importlib.metadata import PackageNotFoundError, version

    needed = re.search(r'requires = \["setuptools>=(\d+)"\]', (ROOT / "pyproject.toml").read_text())
    try:
        have = int(version("setuptools").split(".")[0])
    except PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if needed and have >= int(needed.group(1)) else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in _copied():
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    for stale in src.glob("*.egg-info"):
        shutil.rmtree(stale)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *_isolation(), "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    [built] = out.glob("*.whl")
    return built


def _tracked(folders: list[str]) -> list[str]:
    """The files of ``folders`` the repository holds (git's list; every file where there is no ``.git``)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--", *folders], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for f in folders for p in (ROOT / f).rglob("*") if p.is_file()]
    return [f for f in listed if "__pycache__" not in f]


def test_the_wheel_holds_every_file_of_the_packages_not_only_their_python(wheel):
    """The gateway image crash-looped: ``gateway/web/static`` (the page's HTML, scripts and styles) was not in
    the wheel, since package-data named only *.json, *.pbtxt, *.md, *.mako and py.typed, and
    ``StaticFiles(directory=...)`` refuses a folder that is not there."""
    packages = [n for n in _copied() if (ROOT / n).is_dir()]
    held = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _tracked(packages) if not f.startswith(RESULTS) and f not in held]
    assert not missing, f"files of the packages the wheel leaves out: {missing}"


def test_the_installed_app_starts_and_serves_its_page_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    script = textwrap.dedent(f"""
        import gateway, gateway.main
        from pathlib import Path
        assert Path(gateway.__file__).is_relative_to({str(site)!r}), gateway.__file__
        from fastapi.testclient import TestClient
        from gateway.settings import Settings
        app = gateway.main.create_app(Settings(data_dir={str(tmp_path / "data")!r}, triton_urls="127.0.0.1:1",
                                               auth_insecure=True))
        client = TestClient(app)  # no lifespan: the page and its files need no Triton nor store
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower(), page.status_code
        for name in ("main.js", "style.css"):
            assert client.get(f"/web/static/{{name}}").status_code == 200, name
        print("served")
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTSCREEN_")}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "served" in done.stdout, done.stderr[-3000:]


def _pins() -> dict[str, str]:
    """constraints.txt's ``name==version`` lines, by canonical name."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_dependency_is_installed_at_the_version_constraints_txt_pins():
    """A fresh clone and an image built months later get the versions the suite passed with: scripts/setup.sh and
    the gateway image install with ``-c constraints.txt``, which pins every dependency pyproject.toml declares (base
    and extras) at a version its range admits, and this environment (set up by setup.sh) holds exactly those.
    torch and torchvision are pinned in pyproject.toml itself (their build is the machine's), and nothing only they
    bring (CUDA 13 libraries) is pinned."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for req in declared:
        name = canonicalize_name(req.name)
        if name in ("torch", "torchvision"):
            assert str(req.specifier).startswith("==") and name not in pins, req
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt (run scripts/constraints.sh)"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"{name}=={pins[name]} is not {req}"
    assert not [n for n in pins if n.startswith("nvidia-") and n not in ("nvidia-cuda-runtime-cu12", "nvidia-pytriton")]
    stale = {}
    for name, pinned in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            continue
        if Version(have) != Version(pinned):
            stale[name] = (have, pinned)
    assert not stale, f"installed against pinned (scripts/setup.sh installs the pins): {stale}"
    assert 'install -c constraints.txt -e ".' in (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install --no-cache-dir --prefix=/install -c constraints.txt ." in DOCKERFILE.read_text()
    assert "constraints.txt" in _copied()
