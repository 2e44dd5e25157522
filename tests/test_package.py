"""The package as users meet it: what `import srd_ext` loads, the submodules reachable after it,
one version, and documentation that stays inside the repository."""

import importlib.metadata
import json
import re
import subprocess
import sys

import pytest

import srd_ext

from programs import ROOT, run_script

LAZY = ["apop", "baselines", "cli", "concepts", "data", "distributed", "interop", "metrics", "models", "viz", "zoo"]


def _fresh(code: str) -> dict:
    """Runs ``code`` in a new interpreter (nothing imported yet); it prints one JSON line."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_plain_import_loads_no_optional_module():
    out = _fresh("import json, sys, srd_ext; print(json.dumps(sorted(sys.modules)))")
    loaded = set(out)
    for name in ["torchvision", "matplotlib", "captum", "pytorch_grad_cam", "quantus", "timm", "PIL"]:
        assert name not in loaded, f"import srd_ext imported {name}"
    for name in LAZY:
        assert f"srd_ext.{name}" not in loaded, f"import srd_ext imported srd_ext.{name}"


def test_submodules_are_reachable_after_import():
    out = _fresh(
        "import json, srd_ext\n"
        "m = srd_ext.models.load_model('shapes-vgg')\n"
        f"mods = {{n: getattr(srd_ext, n).__name__ for n in {LAZY!r}}}\n"
        "print(json.dumps({'model': type(m).__name__, 'training': m.training, 'mods': mods,\n"
        "                  'explain': callable(srd_ext.explain), 'capture': srd_ext.capture.__name__}))"
    )
    assert out["model"] == "VGG" and out["training"] is False
    assert out["mods"] == {n: f"srd_ext.{n}" for n in LAZY}
    # srd_ext.explain stays the function; the capture module is srd_ext.capture.
    assert out["explain"] is True and out["capture"] == "srd_ext.capture"


def test_lazy_names_and_unknown_attributes():
    assert srd_ext.explain_func is srd_ext.interop.explain_func and srd_ext.SRD is srd_ext.interop.SRD
    assert set(LAZY) <= set(dir(srd_ext)) and {"explain_func", "SRD", "explain"} <= set(dir(srd_ext))
    with pytest.raises(AttributeError, match="has no attribute 'not_a_module'"):
        srd_ext.not_a_module  # noqa: B018


def test_one_version():
    from srd_ext._version import __version__

    assert srd_ext.__version__ == __version__ == importlib.metadata.version("srd_ext")
    assert "version =" not in (ROOT / "setup.py").read_text()
    assert re.search(r'^dynamic = \["version"\]', (ROOT / "pyproject.toml").read_text(), re.M)


def _tracked_files():
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.splitlines() if (ROOT / p).is_file()]


def test_markdown_links_stay_inside_the_repository():
    files = [p for p in _tracked_files() if p.suffix == ".md"]
    assert any(p.name == "README.md" for p in files)
    for md in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            path = (md.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{md.relative_to(ROOT)}: link {target}"


def test_no_file_points_outside_the_repository():
    # A relative path that climbs out of the clone (a sibling folder of notes, say) means nothing
    # to a user: every "../" path written in a file must resolve inside the repository.
    pattern = re.compile(r"(?:\.\./)+[\w.-][\w./-]*")
    for p in _tracked_files():
        if p.suffix in (".png", ".pt", ".so", ".jpg"):
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        for m in pattern.finditer(text):
            path = (p.parent / m.group(0)).resolve()
            assert path.is_relative_to(ROOT), f"{p.relative_to(ROOT)} points outside the repository: {m.group(0)}"


def test_license_is_mit_and_declared():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize(
    "script",
    [
        "benchmarks/eval_table.py",
        "benchmarks/quantus_suite.py",
        "benchmarks/manipulation.py",
        "benchmarks/bench_ops.py",
        "examples/apop_accuracy.py",
        "examples/demo.py",
        "examples/train_right_reasons.py",
        "examples/train_shapes.py",
    ],
)
def test_scripts_start(script):
    """Every script imports what it uses (the library, benchmarks/common.py) and parses its options."""
    assert "usage:" in run_script(script, "--help").stdout
