# The house rules a reader relies on: short functions, short lines, imports that run one way, a short README.
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(ROOT.glob("*.py"))
SCRIPTS = {"train", "sample", "bench"}                 # command-line scripts: nothing imports them
STANDALONE = {"pixart_min", "vae", "shapes"}           # they import none of the project's other files


def functions(path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def project_imports(path):
    names = {p.stem for p in MODULES}
    found = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            found |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.add(n.module.split(".")[0])
    return found & names


def test_no_function_is_longer_than_80_lines_and_train_main_fits_60():
    long = [f"{p.name}:{f.name} ({f.end_lineno - f.lineno + 1})" for p in MODULES for f in functions(p)
            if f.end_lineno - f.lineno + 1 > 80]
    assert not long, long
    main = next(f for f in functions(ROOT / "train.py") if f.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 60


def test_no_line_is_longer_than_120_characters():
    long = [f"{p.relative_to(ROOT)}:{i}" for p in [*MODULES, *sorted((ROOT / "tests").glob("*.py"))]
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long, long


def test_imports_run_one_way():
    imports = {p.stem: project_imports(p) for p in MODULES}
    assert {"pixart_min", "vae", "shapes", "data", "dit", "train", "sample"} <= imports.keys()
    assert not {m: i & SCRIPTS for m, i in imports.items() if i & SCRIPTS}      # nobody imports a script
    assert not {m: imports[m] for m in STANDALONE if imports[m]}                # the model, VAE, world stand alone


def test_pixart_min_keeps_its_shape():
    lines = (ROOT / "pixart_min.py").read_text().splitlines()
    text_section = next(i for i, line in enumerate(lines, 1) if line.startswith("# ====") and "Text" in line)
    assert text_section <= 430 and len(lines) <= 660, (text_section, len(lines))   # 660: Sigma, LCM, editing


def test_readme_is_one_page():
    assert len((ROOT / "README.md").read_text().split()) <= 2500
