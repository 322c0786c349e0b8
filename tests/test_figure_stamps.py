"""Every published figure is stamped, and stamped with the models that ship (issue 17, item 4).

Fast and offline: it reads the result files of ``python -m benchmarks figures`` (``make bench``) and the
evaluation reports README cites, and hashes ``model_repository/*/1/model.onnx`` the way the stamps do
(:func:`ctscreen.repo.model_provenance`). A figure measured on other models, or before stamps named the
models, fails here until ``make bench`` regenerates it.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import figures, readme_figures, stamps
from benchmarks.common import ROOT, machine_info
from ctscreen.machine import code_commit

SHIPPED = stamps.shipped_models()


def test_the_shipped_models_are_there_to_compare_with() -> None:
    assert set(SHIPPED) == set(stamps.STAMPED_MODELS)
    for name, m in SHIPPED.items():
        card = json.loads((ROOT / "model_repository" / name / "1" / "model_card.json").read_text())
        assert m["sha256"] == card["sha256"] and m["version"] == card["version"]


@pytest.mark.parametrize("step", figures.PLAN, ids=lambda s: s.name)
def test_published_figures_are_stamped_with_the_shipped_models(step: figures.Step) -> None:
    issues = [msg for out in step.outputs for msg in stamps.problems(ROOT / out, models=step.models, shipped=SHIPPED)]
    assert not issues, ("regenerate with `make bench` (python -m benchmarks figures --only "
                        f"{step.name}) on a quiet machine:\n" + "\n".join(issues))


def test_every_result_file_is_regenerated_by_the_plan() -> None:
    """A result file no step writes would never be regenerated, nor checked above."""
    planned = {out for s in figures.PLAN for out in s.outputs} | {"benchmarks/results/load-latest.json"}
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").rglob("*-latest.json")
             if "tmp" not in p.relative_to(ROOT / "benchmarks" / "results").parts}
    found.discard("benchmarks/results/gpu-latest.json")  # written on a GPU node only (gpu_paper_profile.py)
    assert found <= planned, f"not in benchmarks.figures.PLAN: {sorted(found - planned)}"


def _short(sha: str) -> str:
    return f"`{sha[:12]}`"


def test_the_readmes_name_the_shipped_models() -> None:
    """README.md's performance table and benchmarks/README.md's latest figures carry the models' stamp."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split(readme_figures.BEGIN)[1].split(readme_figures.END)[0]
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    latest = bench.split("<!-- BEGIN LATEST FIGURES")[1].split("<!-- END LATEST FIGURES")[0]
    for name, where in (("README.md performance table", block), ("benchmarks/README.md latest figures", latest)):
        for model, m in SHIPPED.items():
            assert f"{model} {m['version']} {_short(m['sha256'])}" in where, (
                f"{name} does not name {model} {m['version']} {m['sha256'][:12]}: regenerate with `make bench`")
        assert "stale" not in where, f"{name} has stale rows: regenerate with `make bench`"


# --- the check itself -------------------------------------------------------------------------------


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_the_model_cards_carry_the_published_real_ct_report() -> None:
    """The shipped cards quote docs/models/real.json (the report the README cites), measured on the shipped
    ONNX files; a report regenerated without the cards (or the other way round) fails here: regenerate
    with `ctscreen export TASK --card-only --metrics docs/models/real.json`."""
    from training.card import INTENDED_USE, card_metrics, limitations_for

    real = json.loads((ROOT / "docs" / "models" / "real.json").read_text())
    for model in SHIPPED:
        card = json.loads((ROOT / "model_repository" / model / "1" / "model_card.json").read_text())
        assert real["models"][model]["sha256"] == card["sha256"], f"docs/models/real.json measured other {model} weights"
        assert card["metrics"] == card_metrics(model, real), f"the {model} card quotes another report"
        assert card["limitations"] == limitations_for(card.get("training")), f"the {model} card's limitations are stale"
        assert card["intended_use"] == INTENDED_USE[model], f"the {model} card's intended use is stale"
        md = (ROOT / "model_repository" / model / "1" / "model_card.md").read_text()
        assert "## Intended use\n\n**Not a medical device**" in md, f"the {model} card.md is stale"


def test_card_only_rewrites_the_cards_words_from_the_code(tmp_path: Path) -> None:
    """`ctscreen export TASK --card-only` (training.card.update_card_metrics) rewrites the intended use and the
    limitations from training/card.py, not only the metrics: a card's words do not go stale."""
    from training.card import INTENDED_USE, LIMITATIONS_REAL, update_card_metrics

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not a model")
    (tmp_path / "model_card.json").write_text(json.dumps({
        "name": "lesion", "version": "0", "intended_use": "old words", "limitations": "old limits",
        "training": {"real_ct": {}}, "metrics": {}}))
    jpath, mpath = update_card_metrics(onnx, {"x": 1})
    card = json.loads(jpath.read_text())
    assert (card["intended_use"], card["limitations"], card["metrics"]) == (INTENDED_USE["lesion"], LIMITATIONS_REAL, {"x": 1})
    md = mpath.read_text()
    assert "**Not a medical device**" in md and "Toshiba lower-chest slice" in md and "phantom only" in md


def test_a_copy_of_the_tree_is_stamped_with_the_commit_its_copier_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU node or an image gets a copy of the tree whose .git may be missing or stale: the commit
    named in CTSCREEN_COMMIT wins, and whether the copy had changes is then unknown."""
    own = machine_info()
    assert own["commit"] and own["dirty"] is not None  # this checkout: git answers
    monkeypatch.setenv("CTSCREEN_COMMIT", "e08c0e1")
    named = machine_info()
    assert named["commit"] == "e08c0e1" and named["dirty"] is None


def test_the_gpu_figure_when_there_is_one_is_stamped_with_the_shipped_models() -> None:
    """gpu-latest.json comes from a GPU node (gpu_paper_profile.py), not from the plan; its stamp is checked
    all the same: the post-processing it measures ran on the shipped models' maps."""
    path = ROOT / "benchmarks" / "results" / "gpu-latest.json"
    if not path.is_file():
        pytest.skip("no GPU figure yet: benchmarks/gpu_paper_profile.py run on a GPU node writes it")
    assert stamps.problems(path, shipped=SHIPPED) == []


def test_a_stamp_is_checked_field_by_field(tmp_path: Path) -> None:
    stamp = machine_info()
    assert {"commit", "time_utc", "loadavg_1m", "cpu", "cores", "models", "dirty"} <= set(stamp)
    assert stamp["models"] == SHIPPED
    good = _write(tmp_path / "good.json", {"machine": stamp, "x": 1})
    assert stamps.problems(good, shipped=SHIPPED) == []

    edited = json.loads(good.read_text())
    edited["machine"]["models"]["lesion"]["sha256"] = "0" * 64  # a figure of other weights
    msgs = stamps.problems(_write(tmp_path / "edited.json", edited), shipped=SHIPPED)
    assert len(msgs) == 1 and f"lesion sha256 {'0' * 64} is" in msgs[0] and "not the shipped" in msgs[0]
    # a figure that does not depend on the models keeps its stamp but is not held to them
    assert stamps.problems(tmp_path / "edited.json", models=False, shipped=SHIPPED) == []

    old = json.loads(good.read_text())
    del old["machine"]["models"], old["machine"]["time_utc"]
    msgs = stamps.problems(_write(tmp_path / "old.json", old), shipped=SHIPPED)
    assert any("lacks time_utc" in m for m in msgs) and any("no model sha256" in m for m in msgs)
    assert stamps.problems(_write(tmp_path / "bare.json", {"x": 1}), shipped=SHIPPED)[0].endswith("no stamp "
                                                                                                   "(no \"machine\" object, no \"models\")")
    assert "missing" in stamps.problems(tmp_path / "absent.json", shipped=SHIPPED)[0]


def test_nested_stamps_and_the_evaluation_reports_shape(tmp_path: Path) -> None:
    stamp = machine_info()
    other = json.loads(json.dumps(stamp))
    other["models"]["valid_area"]["sha256"] = "f" * 64
    report = _write(tmp_path / "report.json", {"machine": stamp, "other_benchmarks": {"models": {"machine": other}}})
    msgs = stamps.problems(report, shipped=SHIPPED)
    assert len(msgs) == 1 and "$.other_benchmarks.models.machine" in msgs[0] and "valid_area" in msgs[0]
    # ctscreen eval: the served models as a list; training reports: {model: {"path", "sha256"}}
    listed = [{"name": n, "sha256": m["sha256"], "version": m["version"]} for n, m in SHIPPED.items()]
    listed.append({"name": "ct_screen", "sha256": None, "version": "1"})
    assert stamps.problems(_write(tmp_path / "eval.json", {"models": listed}), shipped=SHIPPED) == []
    listed[0]["sha256"] = "1" * 64
    assert len(stamps.problems(_write(tmp_path / "eval2.json", {"models": listed}), shipped=SHIPPED)) == 1
    paths = {n: {"path": f"x/{n}.onnx", "sha256": m["sha256"]} for n, m in SHIPPED.items()}
    assert stamps.problems(_write(tmp_path / "q.json", {"models": paths, "machine": "a host"}), shipped=SHIPPED,
                           fields=()) == []


def test_the_plan_prints_and_selects(capsys: pytest.CaptureFixture[str]) -> None:
    assert figures.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"total ~\d+(\.\d+)? min", listed) and "stack" in listed and "accuracy" in listed
    assert figures.main(["--dry-run", "--skip", "accuracy"]) == 0
    out = capsys.readouterr().out
    assert "+ -m benchmarks all --concurrency 1,2" in out and "training.evaluate" not in out
    assert [s.name for s in figures.select(figures.PLAN, ["accuracy"])] == ["eval", "quality", "real", "card-valid-area",
                                                                             "card-lesion", "fov", "noise"]
    with pytest.raises(ValueError, match="unknown step"):
        figures.select(figures.PLAN, ["nope"])


def _prose(text: str) -> str:
    """``text`` with comment markers at line starts dropped and whitespace collapsed."""
    return " ".join(" ".join(re.sub(r"^\s*#", "", line) for line in text.splitlines()).split())


def test_the_stated_durations_are_the_plans() -> None:
    """README said about 45 minutes for the performance rows and 70 with the accuracy reports; the plan's steps
    add up to 61 and 85."""
    perf, accuracy, total = (figures.plan_minutes(group=g) for g in ("performance", "accuracy", None))
    claims = {
        "README.md": f"about {perf} minutes on a quiet 2-core machine for these rows, {total} with the accuracy",
        "benchmarks/README.md": f"the performance figures only (~{perf} min",
        "Makefile": f"about {total} minutes on 2 cores, BENCH_ARGS=\"--skip accuracy\" for the performance "
                    f"figures alone, about {perf})",
    }
    for name, claim in claims.items():
        assert claim in _prose((ROOT / name).read_text()), name
    doc = _prose(figures.__doc__ or "")
    assert f"``performance`` (about {perf} minutes" in doc and f"``accuracy`` (about {accuracy} minutes" in doc
    assert f"{total} in all" in doc


def test_a_step_that_prints_json_is_stamped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(figures, "ROOT", tmp_path)
    step = figures.Step("echo", ("-c", "print('noise'); print('{\"median_s\": 0.5}')"), ("web.json",), False, 0.1,
                        capture="web.json")
    monkeypatch.setattr(figures, "PY", sys.executable)
    r = figures.run_step(step, logs=tmp_path / "logs")
    assert r["rc"] == 0
    doc = json.loads((tmp_path / "web.json").read_text())
    assert doc["median_s"] == 0.5 and doc["machine"]["models"] == SHIPPED
    assert stamps.problems(tmp_path / "web.json", shipped=SHIPPED) == []


def test_a_figure_runs_own_outputs_do_not_mark_the_code_uncommitted(tmp_path: Path) -> None:
    """A figure run rewrites benchmarks/results and the READMEs' tables before its later figures are stamped;
    those must still name a clean commit. A changed source file (or a changed model) is uncommitted code."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for rel in ("benchmarks/results/ratios-latest.json", "README.md", "benchmarks/README.md", "gateway/worker.py",
                "model_repository/lesion/1/model.onnx"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("before\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "x")
    assert code_commit(tmp_path)[1] is False
    for rel in ("benchmarks/results/ratios-latest.json", "README.md", "benchmarks/README.md"):
        (tmp_path / rel).write_text("after\n")
    assert code_commit(tmp_path)[1] is False
    for rel in ("gateway/worker.py", "model_repository/lesion/1/model.onnx"):
        (tmp_path / rel).write_text("after\n")
        assert code_commit(tmp_path)[1] is True, rel
        git("checkout", "-q", "--", rel)


def test_the_phantom_quality_report_is_stamped_like_the_others(tmp_path: Path) -> None:
    """docs/models/quality.json (training.evaluate) carries the machine stamp and the commit of the phantom
    that made its studies, as docs/models/real.json does (it had neither: phantom_version read "unknown")."""
    import time

    from training.evaluate import phantom_version, run_stamp

    doc = {**run_stamp("training.evaluate", ["--studies", "1"], time.perf_counter()), "models": SHIPPED}
    assert doc["commit"] != "unknown" and doc["command"] == "python -m training.evaluate --studies 1"
    assert stamps.problems(_write(tmp_path / "quality.json", doc), shipped=SHIPPED) == []
    version = phantom_version()
    assert version != "unknown" and re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", version), version
