"""No import runs back up the layers: a package imports only itself and the layers below it.

Read from the source (:mod:`tests.import_graph`), so an import inside a function counts as much as one
at the top of a module. Packages on the same layer are independent of each other. The one exception
is the ``ctscreen`` command's dispatcher (``ctscreen.cli``), which reaches every command by name.
"""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import ROOT, imports_of, module_name, package_files, private_names_imported

LAYERS: tuple[tuple[str, ...], ...] = (
    # contracts, post-processing, the in-process reference pipeline, machine facts, embedded Triton,
    # the repository renderer: numpy, scipy, onnxruntime and the standard library only
    ("ctscreen",),
    # synthetic studies with truth; the pure case rule, metrics, result schema and encoders
    ("phantom", "aggregator"),
    # the serving path: ingest, Triton client, jobs, deliveries, its HTTP client and commands
    # (`ctscreen demo` makes phantom samples)
    ("gateway",),
    # nets, datasets, export, model cards and quality reports (real DICOM decoded by the gateway's code)
    ("training",),
    # the roof: commands that wire the packages together; nothing imports them
    ("evaluation", "benchmarks"),
)
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}
DISPATCHER = "ctscreen.cli"


def upward_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    """``file:line module -> import`` for each import in ``files`` that leaves its layer for one not below."""
    bad = []
    for path in files:
        module = module_name(path, root)
        if module == DISPATCHER:
            continue
        own = module.split(".")[0]
        for line, name in sorted(imports_of(path, root)):
            target = name.split(".")[0]
            if target in LEVEL and target != own and LEVEL[target] >= LEVEL[own]:
                bad.append(f"{path.relative_to(root)}:{line} {module} -> {name}")
    return bad


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LEVEL)


def test_no_import_runs_up_the_layers():
    files = [f for package in LEVEL for f in package_files(package)]
    assert len(files) > 100
    assert upward_imports(files) == []


def test_no_private_name_crosses_a_module():
    """A name shared between modules is public; ``_name`` stays in its module (tests included)."""
    ours = (*LEVEL, "tests")
    crossing = [f"{path.relative_to(ROOT)}:{line} {name}"
                for package in ours for path in package_files(package)
                for line, name in private_names_imported(path) if name.split(".")[0] in ours]
    assert crossing == []


def test_the_check_sees_imports_inside_functions_and_between_peers(tmp_path):
    (tmp_path / "aggregator").mkdir()
    (tmp_path / "aggregator" / "__init__.py").write_text("from . import case\n")
    bad = tmp_path / "aggregator" / "case.py"
    bad.write_text("import numpy\nfrom ctscreen import contracts\n\n\ndef f():\n    from gateway.cli import run_stack\n"
                   "    import phantom\n    importlib.import_module('evaluation.cli')\n")
    files = package_files("aggregator", tmp_path)
    assert upward_imports(files, tmp_path) == [
        "aggregator/case.py:6 aggregator.case -> gateway.cli",
        "aggregator/case.py:7 aggregator.case -> phantom",
        "aggregator/case.py:8 aggregator.case -> evaluation.cli",
    ]
