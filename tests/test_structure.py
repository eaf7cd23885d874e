"""The layout the code relies on, checked: which of the three distributions imports which (read from the source
with ast), a serving-only install in a fresh virtualenv that has no JAX, pandas or training code and still serves,
and local files named serve.py or export.py that cannot shadow our packages."""

from __future__ import annotations

import ast
import graphlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the three distributions' packages, dependencies one way: serve <- training <- export
PACKAGES = {
    "sasrec_serve": ROOT / "serve" / "sasrec_serve",
    "sasrec_jax": ROOT / "sasrec_jax",
    "sasrec_export": ROOT / "export" / "sasrec_export",
}
# may import the http extra (fastapi, uvicorn, prometheus_client, ...) at module level; cli.py only in functions
HTTP_MODULES = {"sasrec_serve.app", "sasrec_serve.metrics"}
HTTP_EXTRA = {"fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"}
TRAINING_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "pandas", "sasrec_jax", "sasrec_export")


def _modules(package: str) -> dict[str, Path]:
    """{dotted module name: file} for every module of a package, from its directory."""
    root = PACKAGES[package]
    assert (root / "__init__.py").is_file(), f"{root} is not the package {package}"
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = {name: path for package in PACKAGES for name, path in _modules(package).items()}


def _top(module: str) -> str:
    return module.partition(".")[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Imports(ast.NodeVisitor):
    """Every import of a module, wherever it is (module level, functions, `if`/`try`), as (module imported, names
    taken from it or None, at module level?); relative imports made absolute; importlib.import_module("x") and
    __import__("x") with a literal name count too. Also every dotted name read through an imported name
    (`B._helper` after `from sasrec_serve import bundle as B` is sasrec_serve.bundle._helper)."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str] | None, bool]] = []
        self.depth = 0  # > 0 inside a function
        self.bound: dict[str, str] = {}  # name in this module -> what it was imported as
        self.chains: list[list[str]] = []  # a.b.c read anywhere, as ["a", "b", "c"]

    def references(self) -> set[str]:
        return {".".join([self.bound[c[0]], *c[1:]]) for c in self.chains if c[0] in self.bound}

    def visit_Attribute(self, node: ast.Attribute):
        chain, n = [], node
        while isinstance(n, ast.Attribute):
            chain.insert(0, n.attr)
            n = n.value
        if isinstance(n, ast.Name):
            self.chains.append([n.id, *chain])
        else:
            self.generic_visit(node)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        self.found += [(a.name, None, self.depth == 0) for a in node.names]
        for a in node.names:
            if a.asname:
                self.bound[a.asname] = a.name
            else:
                self.bound[_top(a.name)] = _top(a.name)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        module = node.module or ""
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([module] if module else []))
        self.found.append((module, [a.name for a in node.names], self.depth == 0))
        self.bound.update({a.asname or a.name: f"{module}.{a.name}" for a in node.names})

    def visit_Call(self, node: ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self.found.append((arg.value, None, self.depth == 0))
        self.generic_visit(node)


def _visit(module: str, source: str) -> _Imports:
    visitor = _Imports(module, is_package=MODULES.get(module, Path()).name == "__init__.py")
    visitor.visit(ast.parse(source))
    return visitor


def _imports(module: str, source: str) -> list[tuple[str, list[str] | None, bool]]:
    return _visit(module, source).found


VISITS = {name: _visit(name, path.read_text()) for name, path in MODULES.items()}
IMPORTS = {name: v.found for name, v in VISITS.items()}


def test_the_packages_are_found():
    assert {_top(m) for m in MODULES} == set(PACKAGES)
    for must in ("sasrec_serve.predictor", "sasrec_serve.app", "sasrec_jax.train", "sasrec_export.bundle"):
        assert must in MODULES and IMPORTS[must], must  # the walk sees the modules and their imports


def test_dependencies_go_one_way_with_no_private_names_and_no_cycle():
    """sasrec_serve imports neither sasrec_jax nor sasrec_export; sasrec_jax never imports sasrec_export (it finds
    `sasrec-jax export` through an entry point); no module takes a private name (or private module) from another of
    our packages; the graph of the three packages has no cycle."""
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    private = set()
    for module, found in IMPORTS.items():
        own = _top(module)
        for imported, names, _ in found:
            if _top(imported) in PACKAGES and _top(imported) != own:
                edges[own].add(_top(imported))
                parts = imported.split(".")[1:] + (names or [])
                private |= {f"{module}: from {imported} import {names}" for p in parts if _private(p)}
        for name in VISITS[module].references():
            if _top(name) in PACKAGES and _top(name) != own and any(map(_private, name.split(".")[1:])):
                private.add(f"{module}: {name}")
    assert edges["sasrec_serve"] == set(), "the serving package imports training or export code"
    assert "sasrec_export" not in edges["sasrec_jax"], "sasrec_jax imports sasrec_export"
    assert edges["sasrec_jax"] <= {"sasrec_serve"} and edges["sasrec_export"] <= {"sasrec_serve", "sasrec_jax"}
    assert not private, "private names used across packages:\n" + "\n".join(sorted(private))
    graphlib.TopologicalSorter(edges).prepare()  # raises CycleError on a cycle


def _our_code() -> dict[str, str]:
    """{file: Python source} for the packages, tests, benchmarks and notebooks (their code cells)."""
    files = {str(p): p.read_text() for p in MODULES.values()}
    for folder in ("tests", "benchmarks", "notebooks"):
        for path in (ROOT / folder).rglob("*.py"):
            files[str(path)] = path.read_text()
        for path in (ROOT / folder).rglob("*.ipynb"):
            cells = json.loads(path.read_text())["cells"]
            files[str(path)] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return files


def test_nothing_imports_a_top_level_serve_or_export():
    """The packages were once called `serve` and `export`: any such import left would pick up whatever module of
    that name comes first on sys.path (see the shadowing test below)."""
    bad = []
    for file, source in _our_code().items():
        for imported, _, _ in _imports("tests.x", source):  # relative imports do not matter here
            if _top(imported) in ("serve", "export"):
                bad.append(f"{file}: {imported}")
    assert not bad, "\n".join(bad)


def test_the_predictor_side_imports_only_numpy_and_onnxruntime():
    """Of sasrec_serve, only the HTTP app (app.py, metrics.py) imports the `http` extra at module level, and
    cli.py inside the function that starts the server; everything else imports the standard library, numpy and
    onnxruntime, so `pip install sasrec-serve` (no extra) loads and runs a bundle (shown for real below)."""
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "sasrec_serve"}
    bad = []
    for module, found in IMPORTS.items():
        if _top(module) != "sasrec_serve":
            continue
        for imported, names, top_level in found:
            top = _top(imported)
            if module in HTTP_MODULES or (module == "sasrec_serve.cli" and not top_level):
                ok = top in allowed | HTTP_EXTRA
            else:  # nor the HTTP modules themselves, at module level (`from sasrec_serve import app` too)
                referenced = {imported} | {f"{imported}.{n}" for n in names or []}
                ok = top in allowed and not (top_level and referenced & HTTP_MODULES)
            if not ok:
                bad.append(f"{module}: {imported}{'' if top_level else ' (in a function)'}")
    assert not bad, "\n".join(bad)
    importers = {m for m, found in IMPORTS.items() for i, _, _ in found if _top(i) == "prometheus_client"}
    assert importers == {"sasrec_serve.metrics"}  # the HTTP app's metrics, nothing else


# -- a serving-only install ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = """
import importlib.util, json, sys
from importlib import metadata

import sasrec_serve
from sasrec_serve import Predictor

rec = Predictor.load(sys.argv[1]).recommend(["sku1", "sku2"], k=3)
print(json.dumps({
    "importable": [m for m in sys.argv[2:] if importlib.util.find_spec(m) is not None],
    "dists": sorted(d.metadata["Name"] for d in metadata.distributions()),
    "files": [str(f) for f in metadata.files("sasrec-serve")],
    "package": sasrec_serve.__file__,
    "items": list(rec.items),
}))
"""


@pytest.mark.slow
def test_serving_only_install_has_no_training_code_and_serves(tmp_path, tmp_path_factory):
    """`pip install serve` (not editable) in a new virtualenv without system site-packages: JAX, flax, optax,
    pandas, sasrec_jax and sasrec_export cannot be imported, the installed files are exactly the sasrec_serve
    package (no training module), and Predictor.load recommends what it does here; with `serve[http]` added,
    `sasrec-serve BUNDLE` answers POST /v1/recommend and /metrics."""
    httpx = pytest.importorskip("httpx")
    from sasrec_serve import Predictor

    from tests.serve_bundles import tiny_bundle

    bundle = tiny_bundle(tmp_path_factory)  # built here, with the training stack; served there, without it
    want = list(Predictor.load(bundle).recommend(["sku1", "sku2"], k=3).items)
    # a copy of the source, so building the wheel leaves no build/ or egg-info in the working tree
    src = tmp_path / "src" / "serve"
    shutil.copytree(ROOT / "serve", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist"))
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()  # the cwd: nothing of the repository on sys.path
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PROMETHEUS_MULTIPROC_DIR")}  # fmt: skip
    env.update(PYTHONNOUSERSITE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    python = str(venv / "bin" / "python")

    def run(*argv, timeout=900):
        r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{argv}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run(sys.executable, "-m", "venv", str(venv))
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    run(python, "-m", "pip", "install", "--quiet", str(src))
    probe = json.loads(run(python, "-c", PROBE, str(bundle), *TRAINING_STACK, *HTTP_EXTRA).splitlines()[-1])
    assert probe["importable"] == [], f"importable in a serving-only install: {probe['importable']}"
    assert Path(probe["package"]).is_relative_to(venv), probe["package"]  # the installed copy, not the repository
    assert probe["items"] == want
    assert not {d.lower() for d in probe["dists"]} & {"sasrec-jax", "sasrec-export", "jax", "flax", "pandas"}
    installed = {f for f in probe["files"] if f.startswith("sasrec_serve/") and f.endswith(".py")}
    source = {str(p.relative_to(ROOT / "serve")) for p in PACKAGES["sasrec_serve"].rglob("*.py")}
    assert installed == source  # the serving package, nothing else: no sasrec_jax, no training module
    assert not [f for f in probe["files"] if "sasrec_jax" in f or "sasrec_export" in f]

    run(python, "-m", "pip", "install", "--quiet", f"{src}[http]")
    probe = json.loads(run(python, "-c", PROBE, str(bundle), *TRAINING_STACK).splitlines()[-1])
    assert probe["importable"] == [], f"the http extra brought in {probe['importable']}"
    port = _free_port()
    proc = subprocess.Popen([str(venv / "bin" / "sasrec-serve"), str(bundle), "--port", str(port)], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to a minute for the server to start; an answer ends the wait
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("sasrec-serve did not become ready")
        r = httpx.post(f"{url}/v1/recommend", json={"items": ["sku1", "sku2"], "k": 3})
        assert r.status_code == 200 and r.json()["items"] == want, r.text
        metrics = httpx.get(f"{url}/metrics")
        assert metrics.status_code == 200 and "sasrec_requests_total" in metrics.text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out[-3000:]


# -- shadowing -------------------------------------------------------------------------------------------------


def test_local_serve_and_export_modules_do_not_shadow_our_packages(tmp_path):
    """A project of the user's with its own serve.py and export.py, run from its directory (and first on
    PYTHONPATH): our commands and imports never pick them up."""
    for name in ("serve", "export"):
        (tmp_path / f"{name}.py").write_text(f"raise RuntimeError('the local {name}.py was imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}

    def run(*argv):
        return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    shadowed = run("-c", "import serve")
    assert shadowed.returncode != 0 and "the local serve.py was imported" in shadowed.stderr  # the trap is set
    for argv in (["-m", "sasrec_jax", "export", "--help"], ["-m", "sasrec_serve", "--help"],
                 ["-c", "import sasrec_serve, sasrec_export"]):  # fmt: skip
        r = run(*argv)
        assert r.returncode == 0, f"{argv}: {r.stderr[-3000:]}"
        assert "was imported" not in r.stdout + r.stderr
        if "--help" in argv:
            assert r.stdout.startswith("usage:"), r.stdout[:500]
