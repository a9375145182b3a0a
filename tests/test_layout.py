"""The layout README's file table describes: the top level holds the method files and tasks.py, everything else
sits in plumbing/; the imports between modules have no circle, the method files import none of their callers, the
pure ones import nothing of the project, every module says in its first line what it is, and model_loader imports
without the gguf package."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The method files in the order data flows through them (README's diagram); dpo_loss, pure functions of tensors,
# serves mipo (sequence log-probs for the meter) and train (the loss).
METHOD = ("dpo_loss", "model_loader", "sampler", "mipo", "train", "eval")
TOP_LEVEL = {*METHOD, "tasks"}
MODULES = sorted([p.stem for p in ROOT.glob("*.py")] +
                 [f"plumbing.{p.stem}" for p in (ROOT / "plumbing").glob("*.py") if p.stem != "__init__"])


def source(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def project_imports(module: str) -> set[str]:
    """The project modules `module` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(source(module).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from plumbing import files
    return (names & set(MODULES)) - {module}


GRAPH = {module: project_imports(module) for module in MODULES}


def test_the_checker_sees_imports():
    assert "mipo" in GRAPH["train"] and "dpo_loss" in GRAPH["train"] and "plumbing.files" in GRAPH["tasks"]
    assert "plumbing.files" in GRAPH["plumbing.runs"]
    assert set(METHOD) <= set(MODULES)


def test_the_top_level_is_the_method_and_tasks():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_LEVEL


def test_no_import_circle():
    done, on_path = set(), []

    def visit(module):
        assert module not in on_path, f"import circle: {' -> '.join(on_path[on_path.index(module):] + [module])}"
        if module in done:
            return
        on_path.append(module)
        for imported in GRAPH[module]:
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_data_flows_one_way_through_the_method_files():
    for i, module in enumerate(METHOD):
        later = set(METHOD[i + 1:]) - {"sampler"} if module == "model_loader" else set(METHOD[i + 1:])
        assert not GRAPH[module] & later, f"{module}.py imports a later stage: {sorted(GRAPH[module] & later)}"
    # model_loader's command line answers a question with the sampler, the one use of a later stage it makes
    assert GRAPH["model_loader"] & set(METHOD) <= {"sampler"}


def test_the_pure_modules_import_nothing_of_the_project():
    for module in ("dpo_loss", "sampler", "plumbing.files"):
        assert not GRAPH[module], f"{module} imports {sorted(GRAPH[module])}"


def test_every_module_says_what_it_is_in_its_first_line():
    for module in MODULES + ["plumbing.__init__"]:
        doc = ast.get_docstring(ast.parse(source(module).read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"{module} has no docstring that says what it is"


def test_model_loader_imports_without_gguf():
    # A local Hugging Face directory needs no gguf reader: only the bundled models (gguf files) do.
    code = "import sys; sys.modules['gguf'] = None; import model_loader, sampler, mipo, train, eval"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
