"""Repository structure: import directions (STYLE.md section 1) and packaging in pyproject.toml.

    kernels  <-  models  <-  parallel  <-  trainer  <-  launch
                               data    <-  trainer

Every import is read with `ast` (module level and inside functions, relative imports resolved,
`from torch import distributed` counted as `torch.distributed`, literal `importlib.import_module`
calls included), so no code is executed. The checker has its own tests on small sources, so a
rule that silently stopped matching would show.
"""

from __future__ import annotations

import ast
import os
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "models", "parallel", "trainer", "data", "launch")
NS = "titanforge"

# layer -> module prefixes it must not import.
FORBIDDEN = {
    "kernels": ("torch.distributed",),
    "models": ("torch.distributed", f"{NS}.parallel", f"{NS}.trainer", f"{NS}.launch", f"{NS}.data"),
    "parallel": (f"{NS}.trainer", f"{NS}.launch"),
    "data": (f"{NS}.models", f"{NS}.parallel", f"{NS}.trainer", f"{NS}.launch"),
    "trainer": (f"{NS}.launch",),
    "launch": (),
}
# kernels/ may import nothing but these (plus the standard library).
KERNEL_ALLOWED = ("torch", "triton", f"{NS}.kernels")


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in `source`, a module of package `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
            # `from torch import distributed` imports the submodule torch.distributed.
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value.split(":")[0]))
    return found


def violations(source: str, layer: str, package: str) -> list[str]:
    out = []
    for line, module in imported_modules(source, package):
        root = module.split(".")[0]
        if root in LAYERS:
            out.append(f"line {line}: `{module}` bypasses the namespace; import `{NS}.{module}`")
        for bad in FORBIDDEN[layer]:
            if _under(module, bad):
                out.append(f"line {line}: {layer}/ must not import `{module}`")
        if layer == "kernels" and not (root in sys.stdlib_module_names
                                       or any(_under(module, ok) for ok in KERNEL_ALLOWED)):
            out.append(f"line {line}: kernels/ imports only torch, triton and the standard library, not `{module}`")
    return out


def python_files(layer: str):
    for dirpath, dirnames, filenames in os.walk(ROOT / layer):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.parts[:-1])
    return ".".join([NS] + parts)


@pytest.mark.parametrize("layer", LAYERS)
def test_import_directions(layer):
    problems = []
    for path in python_files(layer):
        for v in violations(path.read_text(), layer, package_of(path)):
            problems.append(f"{path.relative_to(ROOT)} {v}")
    assert not problems, "STYLE.md section 1 import directions broken:\n" + "\n".join(problems)


def test_checker_catches_each_kind_of_violation():
    src = (
        "import os\nimport numpy as np\nfrom torch import distributed as dist\n"
        "def f():\n    from ..trainer import loop\n    import importlib\n"
        "    importlib.import_module('titanforge.launch.cli')\nfrom models import x\n"
    )
    kernel = violations(src, "kernels", "titanforge.kernels.ttt")
    assert any("numpy" in v for v in kernel) and not any("`os`" in v for v in kernel)
    assert any("torch.distributed" in v for v in kernel)
    model = violations(src, "models", "titanforge.models.llama")
    assert any("titanforge.launch.cli" in v for v in model) and any("torch.distributed" in v for v in model)
    assert any("bypasses the namespace" in v for v in model)
    # `..trainer` in a module of package titanforge.parallel resolves to titanforge.trainer.
    assert any("titanforge.trainer" in v for v in violations(src, "parallel", "titanforge.parallel"))
    assert violations("import torch\nimport triton.language as tl\nfrom . import naive\n",
                      "kernels", "titanforge.kernels.ttt") == []
    assert imported_modules("from . import naive\n", "titanforge.kernels.ttt") == [
        (1, "titanforge.kernels.ttt"), (1, "titanforge.kernels.ttt.naive")]


def setuptools_section() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_folders() -> dict[str, Path]:
    """Dotted package name -> folder, for every folder holding an __init__.py under the layers."""
    found = {}
    for layer in LAYERS:
        for path in python_files(layer):
            if path.name == "__init__.py":
                found[package_of(path)] = path.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(setuptools_section()["packages"])
    missing = sorted(set(package_folders()) - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_listed_package_exists():
    section = setuptools_section()
    mapping = section["package-dir"]
    assert sorted(mapping) == sorted(f"{NS}.{layer}" for layer in LAYERS)
    for name, folder in mapping.items():
        assert name == f"{NS}.{folder}", f"package-dir maps {name} to {folder}; expected {name.split('.', 1)[1]}"
    gone = []
    for name in section["packages"]:
        top = ".".join(name.split(".")[:2])
        if top not in mapping:
            gone.append(f"{name} (no package-dir entry for {top})")
            continue
        folder = ROOT / mapping[top] / Path(*name.split(".")[2:])
        if not (folder / "__init__.py").is_file():
            gone.append(f"{name} ({folder.relative_to(ROOT)}/__init__.py missing)")
    assert not gone, f"pyproject.toml lists packages that do not exist: {gone}"


def test_no_python_folder_without_init():
    # A folder of .py files without __init__.py is left out of a (non-editable) install.
    orphans = sorted({str(p.parent.relative_to(ROOT)) for layer in LAYERS for p in python_files(layer)
                      if not (p.parent / "__init__.py").is_file()})
    assert not orphans, f"these folders hold .py files but no __init__.py, so they are not installed: {orphans}"


def _inside_repo(path: str | None) -> bool:
    """Whether `path` is one of our source folders (not the .venv/ that may sit in the checkout)."""
    if path is None or not Path(path).resolve().is_relative_to(ROOT):
        return False
    return Path(path).resolve().relative_to(ROOT).parts[:1] in ((layer,) for layer in (*LAYERS, "tests"))


@pytest.mark.parametrize("name", LAYERS)
def test_our_folders_shadow_no_installed_package(name):
    """`import kernels` (the Hugging Face distribution transformers needs), `import data`, ... never
    reach our top-level folders: neither the repository root nor tests/ is on sys.path (make test
    runs `python -P -m pytest`; pytest runs with --import-mode=importlib). Our code imports only
    as `titanforge.*` from the installed package."""
    import importlib.util

    roots = [p for p in sys.path if p in ("", ".") or Path(p).resolve() in (ROOT, ROOT / "tests")]
    assert not roots, f"{roots} on sys.path: our folders would shadow installed packages"
    spec = importlib.util.find_spec(name)
    if spec is not None:
        places = [spec.origin, *(spec.submodule_search_locations or [])]
        assert not any(_inside_repo(p) for p in places), f"`import {name}` resolves to our folder: {places}"


def test_kernels_is_the_installed_distribution_where_transformers_needs_it():
    """transformers >= 5.25 imports the Hugging Face `kernels` package: it must be that one."""
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face `kernels` distribution is not installed")
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and not _inside_repo(spec.origin)
    import transformers.integrations.hub_kernels  # noqa: F401  (failed with our folder first)


def test_processes_we_start_keep_the_working_directory_off_sys_path(tmp_path):
    """The launcher's torchrun command and the SLURM script start Python with -P (and
    PYTHONSAFEPATH for the ranks torchrun starts with `python -m`)."""
    import subprocess

    code = ("import sys; from pathlib import Path; "
            "print(any(Path(p or '.').resolve() == Path.cwd().resolve() for p in sys.path))")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    cli = (ROOT / "launch" / "cli.py").read_text()
    assert '[sys.executable, "-P", "-m", "torch.distributed.run"' in cli and 'PYTHONSAFEPATH' in cli
    slurm = (ROOT / "launch" / "slurm.py").read_text()
    assert '"-P", "-m", "torch.distributed.run"' in slurm and "export PYTHONSAFEPATH=1" in slurm
