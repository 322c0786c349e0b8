"""The chart's engine-build init script (helm/ctscreen/files/build-engines.sh), run with stand-ins.

No GPU here: ``trtexec`` and ``nvidia-smi`` are small shell scripts on PATH. They prove the cache key
(every parameter that changes a plan changes the key), the lock (two pods with one key: one build, two
loads), the atomic publish and the cleanup of interrupted builds and unused keys.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "helm" / "ctscreen" / "files" / "build-engines.sh"

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("bash", "sha256sum", "flock", "timeout")), reason="needs bash, flock"
)

# Records its arguments; with TRTEXEC_GATE set, says it started and waits for the gate file to appear.
FAKE_TRTEXEC = """#!/bin/sh
echo "$@" >> "$TRTEXEC_LOG"
if [ -n "${TRTEXEC_GATE:-}" ]; then
  touch "$TRTEXEC_GATE.started"
  i=0; while [ ! -e "$TRTEXEC_GATE" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
fi
for a in "$@"; do case "$a" in --saveEngine=*) printf 'plan for %s\\n' "$*" > "${a#--saveEngine=}";; esac; done
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *-L*) echo "GPU 0: $FAKE_GPU (UUID: GPU-0)"; [ -z "${FAKE_MIG:-}" ] || echo "  MIG $FAKE_MIG Device 0: (UUID: MIG-0)" ;;
  *) echo "$FAKE_GPU" ;;
esac
"""

# flock as NFSv4 (EFS, Filestore, most RWX classes) applies it: a POSIX lock, so a shared (read) lock on a
# descriptor opened write-only fails with EBADF; a local file system (this machine's) never checks. Then the
# real flock.
NFS_FLOCK = """#!/bin/bash
shared=0; fd=""
for a in "$@"; do case "$a" in -s|--shared) shared=1 ;; [0-9]|[0-9][0-9]) fd="$a" ;; esac; done
if [ "$shared" = 1 ] && [ -n "$fd" ]; then
  flags=$(awk '/^flags:/ {print $2}' "/proc/$$/fdinfo/$fd")
  if [ $(( 8#$flags & 3 )) = 1 ]; then echo "flock: $fd: Bad file descriptor (a read lock on a write-only fd, NFS)" >&2; exit 1; fi
fi
exec REAL_FLOCK "$@"
"""


@pytest.fixture
def src(tmp_path: Path) -> Path:
    for model in ("valid_area", "lesion"):
        d = tmp_path / "src" / model / "1"
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(f"onnx {model}".encode())
        (tmp_path / "src" / model / "config.pbtxt").write_text(
            f'name: "{model}"\nplatform: "tensorrt_plan"\nmax_batch_size: 16\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "flock").write_text(NFS_FLOCK.replace("REAL_FLOCK", str(shutil.which("flock"))))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return tmp_path / "src"


def _env(tmp_path: Path, dst: str = "models", **extra: str) -> dict[str, str]:
    (tmp_path / dst).mkdir(exist_ok=True)
    flock_dir = str(Path(shutil.which("flock")).parent)
    return {
        "PATH": f"{tmp_path / 'bin'}:{flock_dir}:/usr/bin:/bin", "SRC": str(tmp_path / "src"),
        "DST": str(tmp_path / dst), "CACHE": str(tmp_path / "cache"), "BUILD": "true",
        "MODELS": "valid_area lesion", "INPUT_NAME": "HU_SLICES", "MIN_BATCH": "1", "OPT_BATCH": "8",
        "MAX_BATCH": "16", "PRECISION": "fp16", "WORKSPACE_MIB": "1024", "BUILD_TIMEOUT": "60",
        "EXTRA_FLAGS": "", "TRT_VERSION": "10.5.0", "GPU_RESOURCE": "nvidia.com/gpu",
        "TRTEXEC_LOG": str(tmp_path / "trtexec.log"), "HOSTNAME": "pod-a", "FAKE_GPU": "NVIDIA A100-SXM4-80GB",
        **extra,
    }


def _run(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    env = _env(tmp_path, **extra)
    shutil.rmtree(env["DST"])
    Path(env["DST"]).mkdir()
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "trtexec.log"
    return log.read_text().splitlines() if log.exists() else []


def _keys(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"\] (\w+): key (\S+)", stdout))


def test_plans_are_built_once_and_copied_into_the_served_repository(tmp_path, src):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr
    calls = _calls(tmp_path)
    assert len(calls) == 2
    assert "--minShapes=HU_SLICES:1x1x512x512" in calls[0] and "--fp16" in calls[0]
    assert "--maxShapes=HU_SLICES:16x1x512x512" in calls[0]
    plan = tmp_path / "models" / "lesion" / "1" / "model.plan"
    # a copy, not a link into the cache: removing an old key never touches a running pod's plan
    assert plan.is_file() and not plan.is_symlink() and plan.read_text().startswith("plan for")
    assert not (tmp_path / "models" / "lesion" / "1" / "model.onnx").exists()
    assert (tmp_path / "models" / "lesion" / "config.pbtxt").exists()
    key = _keys(first.stdout)["lesion"]
    assert key.startswith("NVIDIA-A100-SXM4-80GB/trt-10.5.0/lesion/")
    entry = tmp_path / "cache" / key
    assert {p.name for p in entry.iterdir()} == {"model.plan", "KEY", "COMPLETE", "LAST_USED"}
    assert "precision=fp16" in (entry / "KEY").read_text()

    again = _run(tmp_path)
    assert again.returncode == 0 and len(_calls(tmp_path)) == 2, "cached plans must not be rebuilt"
    assert "cached plan" in again.stdout and _keys(again.stdout) == _keys(first.stdout)


@pytest.mark.parametrize(
    "change",
    [
        {"FAKE_GPU": "NVIDIA L4"},
        {"FAKE_MIG": "1g.10gb"},
        {"MIG_PROFILE": "3g.40gb"},
        {"GPU_RESOURCE": "nvidia.com/gpu.shared"},
        {"TRT_VERSION": "10.7.0"},
        {"PRECISION": "fp32"},
        {"MIN_BATCH": "2"},
        {"OPT_BATCH": "4"},
        {"MAX_BATCH": "32"},
        {"INPUT_NAME": "SLICES"},
        {"WORKSPACE_MIB": "2048"},
        {"EXTRA_FLAGS": "--builderOptimizationLevel=5"},
        {"onnx": "retrained lesion net"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_the_cache_key_changes_with_every_build_parameter(tmp_path, src, change):
    base = _run(tmp_path, MODELS="lesion")
    assert base.returncode == 0, base.stderr
    change = dict(change)
    if "MAX_BATCH" in change:  # a render with that largest batch
        for model in ("valid_area", "lesion"):
            cfg = src / model / "config.pbtxt"
            cfg.write_text(cfg.read_text().replace("max_batch_size: 16", f"max_batch_size: {change['MAX_BATCH']}"))
    if "onnx" in change:
        (src / "lesion" / "1" / "model.onnx").write_text(change.pop("onnx"))
    changed = _run(tmp_path, MODELS="lesion", **change)
    assert changed.returncode == 0, changed.stderr
    assert _keys(changed.stdout)["lesion"] != _keys(base.stdout)["lesion"]
    assert len(_calls(tmp_path)) == 2, "a new key is a new build"
    # the old entry is still there, untouched: a key path is never replaced
    assert (tmp_path / "cache" / _keys(base.stdout)["lesion"] / "COMPLETE").exists()


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_two_pods_with_one_key_build_once_and_both_load_the_plan(tmp_path, src):
    gate = tmp_path / "gate"
    procs, outs = [], []
    for pod in ("a", "b"):
        out = tmp_path / f"pod-{pod}.out"
        outs.append(out)
        env = _env(tmp_path, dst=f"models-{pod}", MODELS="lesion", HOSTNAME=f"pod-{pod}", TRTEXEC_GATE=str(gate))
        with out.open("w") as fh:
            procs.append(subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=fh, stderr=subprocess.STDOUT))
        if pod == "a":  # pod a holds the lock inside trtexec before pod b starts
            _wait_for(lambda: Path(f"{gate}.started").exists(), "pod a's build to start")
    _wait_for(lambda: "waiting for its lock" in outs[1].read_text(), "pod b to wait on the lock")
    entries = [p.name for p in (tmp_path / "cache").glob("*/*/lesion/*")]
    assert len(entries) == 1 and ".tmp.pod-a." in entries[0], "while building, only pod a's temporary entry exists"
    gate.touch()
    for p in procs:
        assert p.wait(timeout=60) == 0, [o.read_text() for o in outs]
    assert len(_calls(tmp_path)) == 1, "one build for one key"
    a, b = (o.read_text() for o in outs)
    assert "built and published" in a and "published while this pod waited" in b
    plans = [(tmp_path / f"models-{pod}" / "lesion" / "1" / "model.plan").read_text() for pod in "ab"]
    assert plans[0] == plans[1] and plans[0].startswith("plan for")


def test_cleanup_removes_interrupted_builds_and_unused_keys_but_keeps_the_current_one(tmp_path, src):
    assert _run(tmp_path, MODELS="lesion").returncode == 0
    old = _run(tmp_path, MODELS="lesion", TRT_VERSION="10.3.0")
    old_entry = tmp_path / "cache" / _keys(old.stdout)["lesion"]
    subprocess.run(["touch", "-d", "40 days ago", str(old_entry / "LAST_USED")], check=True)
    stale = old_entry.parent / f"{old_entry.name}.tmp.pod-x.123"
    stale.mkdir()
    subprocess.run(["touch", "-d", "2 hours ago", str(stale)], check=True)
    live = old_entry.parent / f"{old_entry.name}.tmp.pod-y.456"  # a build running now: younger than its timeout
    live.mkdir()

    current = _run(tmp_path, MODELS="lesion", CACHE_MAX_AGE_DAYS="30")
    assert current.returncode == 0, current.stderr
    assert not old_entry.exists() and not stale.exists(), current.stdout
    assert live.exists()
    assert (tmp_path / "cache" / _keys(current.stdout)["lesion"] / "COMPLETE").exists()
    assert f"removing {old_entry}" in current.stdout
    assert (tmp_path / "cache" / ".locks" / f"lesion-{old_entry.name}.lock").read_text() == ""  # no longer published


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"MODELS": "missing"}, "model.onnx not found"),
        ({"PRECISION": "int4"}, "PRECISION must be fp16 or fp32"),
        ({"MAX_BATCH": "lots"}, "MAX_BATCH must be a whole number"),
        # a render with another largest batch: Triton refused the plans after both were built (minutes each)
        ({"MAX_BATCH": "32"}, "valid_area: MAX_BATCH 32 (triton.engines.maxBatch) differs from max_batch_size 16"),
    ],
)
def test_bad_input_fails_with_one_clear_line(tmp_path, src, extra, message):
    result = _run(tmp_path, **extra)
    assert result.returncode != 0
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_a_failed_build_leaves_no_entry_behind(tmp_path, src):
    (tmp_path / "bin" / "trtexec").write_text("#!/bin/sh\nexit 3\n")
    result = _run(tmp_path, MODELS="lesion")
    assert result.returncode != 0 and "trtexec failed" in result.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.parent.name == "lesion"]
    assert os.listdir(tmp_path / "models" / "lesion" / "1") == ["model.onnx"]


def test_a_pod_whose_view_lags_behind_a_publish_waits_for_it_and_does_not_build_again(tmp_path, src):
    """NFS: the builder published and let go of the lock, but the next pod's cached view of the folder does
    not show the entry yet; it built the key again, then failed to publish onto it and restarted. The lock
    file, which a lock reads fresh, now says "published": that pod waits for the entry to show. The lag is
    simulated (the entry moved away until the pod waits): no NFS server can run here."""
    first = _run(tmp_path, MODELS="lesion")
    assert first.returncode == 0, first.stderr
    entry = tmp_path / "cache" / _keys(first.stdout)["lesion"]
    lock = tmp_path / "cache" / ".locks" / f"lesion-{entry.name}.lock"
    assert lock.read_text() == "published\n"
    hidden = entry.with_name("hidden")
    entry.rename(hidden)
    out = tmp_path / "pod-b.out"
    env = _env(tmp_path, dst="models-b", MODELS="lesion", HOSTNAME="pod-b")
    with out.open("w") as fh:
        proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=fh, stderr=subprocess.STDOUT)
    _wait_for(lambda: "waiting for it to show here" in out.read_text(), "pod b to wait for the entry")
    hidden.rename(entry)  # the view catches up
    assert proc.wait(timeout=60) == 0, out.read_text()
    assert len(_calls(tmp_path)) == 1, "the key was built once"
    assert (tmp_path / "models-b" / "lesion" / "1" / "model.plan").read_text() == (entry / "model.plan").read_text()

    shutil.rmtree(entry)  # an entry that never shows (removed by hand to force a rebuild): built again
    again = _run(tmp_path, MODELS="lesion", PUBLISH_VISIBLE_S="2")
    assert again.returncode == 0 and "has not shown here in 2s; building it again" in again.stdout, again.stderr
    assert len(_calls(tmp_path)) == 2 and (entry / "COMPLETE").exists()
    assert lock.read_text() == "published\n"


def test_a_pod_that_built_what_another_published_meanwhile_keeps_the_published_entry(tmp_path, src):
    """Its view did not show the other pod's entry, so it built too: publishing onto the entry failed and the
    pod died (and restarted). Now it drops its own build and loads the published plan."""
    gate = tmp_path / "gate"
    out = tmp_path / "pod-b.out"
    env = _env(tmp_path, dst="models-b", MODELS="lesion", HOSTNAME="pod-b", TRTEXEC_GATE=str(gate))
    with out.open("w") as fh:
        proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=fh, stderr=subprocess.STDOUT)
    _wait_for(lambda: Path(f"{gate}.started").exists(), "pod b's build to start")
    [building] = (tmp_path / "cache").glob("*/*/lesion/*.tmp.pod-b.*")
    entry = building.parent / building.name.split(".tmp.")[0]
    entry.mkdir()  # what pod a published meanwhile
    (entry / "model.plan").write_text("plan of pod a\n")
    (entry / "KEY").write_text("key\n")
    (entry / "COMPLETE").write_text("now\n")
    gate.touch()
    assert proc.wait(timeout=60) == 0, out.read_text()
    assert "was published by another pod meanwhile; using it" in out.read_text()
    assert (tmp_path / "models-b" / "lesion" / "1" / "model.plan").read_text() == "plan of pod a\n"
    assert not list(entry.parent.glob("*.tmp.*")), "its own build is not left behind"
