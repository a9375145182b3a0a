"""The layout README's file section describes: the method files at the top level, and the machinery in three
packages around them, each named for its direction. Imports run one way:

    bookkeeping/  (above: command lines and settings, processes, run files, tables)   imported by train.py, eval.py
         |                                                                             bench/, examples/ and tests
         v
    model_loader -> sampler -> mipo -> train, eval; dpo_loss; tasks   <-   transforms/  (beside: opt-in model
         |                                                                 transforms, switched on by the commands)
         v
    formats/  (below: files and formats)

No module imports one of a layer above it, the method files import none of their callers, the pure ones import
nothing of the project, every module says in its first line what it is, and model_loader imports without gguf.
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The method files in the order data flows through them (README's diagram); dpo_loss, pure functions of tensors,
# serves mipo (sequence log-probs for the meter) and train (the loss).
METHOD = ("dpo_loss", "model_loader", "sampler", "mipo", "train", "eval")
COMMANDS = ("train", "eval")  # the method files that are only commands: they may import every layer
TOP_LEVEL = {*METHOD, "tasks"}
PACKAGES = ("formats", "transforms", "bookkeeping")  # below, beside and above the method
MODULES = sorted([p.stem for p in ROOT.glob("*.py")] +
                 [f"{package}.{p.stem}" for package in PACKAGES for p in (ROOT / package).glob("*.py")
                  if p.stem != "__init__"])


def source(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def imports(path: Path, where: str = "anywhere") -> set[str]:
    """The project modules a file imports: "anywhere" (module level or in any function), "module" (at module level
    or in any function but `main`), or "main" (in a function called main)."""
    tree = ast.parse(path.read_text())
    mains = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "main"]
    in_main = {id(node) for main in mains for node in ast.walk(main)}
    names = set()
    for node in ast.walk(tree):
        if where != "anywhere" and (id(node) in in_main) != (where == "main"):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from formats import files
    return names & set(MODULES)


def project_imports(module: str, where: str = "anywhere") -> set[str]:
    return imports(source(module), where) - {module}


def layer(module: str) -> str:
    return module.split(".")[0] if "." in module else "method"


GRAPH = {module: project_imports(module) for module in MODULES}


def test_the_checker_sees_imports():
    assert "mipo" in GRAPH["train"] and "dpo_loss" in GRAPH["train"] and "formats.files" in GRAPH["tasks"]
    assert "formats.files" in GRAPH["bookkeeping.runs"]
    assert "transforms.cpu_speedups" in project_imports("mipo", "main")
    assert "transforms.cpu_speedups" not in project_imports("mipo", "module")
    assert set(METHOD) <= set(MODULES) and {layer(m) for m in MODULES} == {"method", *PACKAGES}


def test_the_top_level_is_the_method_and_tasks():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_LEVEL
    assert not (ROOT / "plumbing").exists()


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


def test_formats_below_import_nothing_above_them():
    for module in MODULES:
        if layer(module) == "formats":
            above = {m for m in GRAPH[module] if layer(m) != "formats"}
            assert not above, f"{module} (below the method) imports {sorted(above)}"


def test_the_method_files_import_no_layer_above_them():
    # The method files that are also a library (mipo.py and model_loader.py are commands too, in their `main`) import
    # the formats below them and each other; a transform only inside `main`, where the command switches it on.
    for module in TOP_LEVEL - set(COMMANDS):
        outside = {m for m in project_imports(module, "module") if layer(m) not in ("method", "formats")}
        assert not outside, f"{module} imports {sorted(outside)}"
        in_main = {m for m in project_imports(module, "main") if layer(m) not in ("method", "formats", "transforms")}
        assert not in_main, f"{module}.main imports {sorted(in_main)}"


def test_transforms_beside_never_import_the_commands_or_bookkeeping():
    for module in MODULES:
        if layer(module) == "transforms":
            wrong = {m for m in GRAPH[module] if layer(m) == "bookkeeping" or m in COMMANDS}
            assert not wrong, f"{module} (beside the method) imports {sorted(wrong)}"


def test_bookkeeping_above_is_imported_only_by_the_commands_bench_examples_and_tests():
    importers = {module: GRAPH[module] for module in MODULES}
    importers |= {f"{p.parent.name}/{p.name}": imports(p) for d in ("bench", "examples", "tests") for p in
                  (ROOT / d).glob("*.py")}
    for module, imported in importers.items():
        if any(layer(m) == "bookkeeping" for m in imported):
            assert module in COMMANDS or layer(module) == "bookkeeping" or "/" in module, \
                f"{module} imports the bookkeeping above the method"


def test_data_flows_one_way_through_the_method_files():
    for i, module in enumerate(METHOD):
        later = set(METHOD[i + 1:]) - {"sampler"} if module == "model_loader" else set(METHOD[i + 1:])
        assert not GRAPH[module] & later, f"{module}.py imports a later stage: {sorted(GRAPH[module] & later)}"
    # model_loader's command line answers a question with the sampler, the one use of a later stage it makes
    assert GRAPH["model_loader"] & set(METHOD) <= {"sampler"}


def test_the_pure_modules_import_nothing_of_the_project():
    for module in ("dpo_loss", "sampler", "formats.files"):
        assert not GRAPH[module], f"{module} imports {sorted(GRAPH[module])}"


def test_nothing_rebinds_another_modules_function_or_an_objects_class():
    # Speed-ups and transforms are switched on by calls a reader can see: nothing assigns into another module (but
    # the crash test hook, formats.files.CRASH_AT) or changes an object's class at run time (tests may, to patch).
    for module in MODULES:
        tree = ast.parse(source(module).read_text())
        module_names = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import,
                        ast.ImportFrom)) for alias in node.names if (alias.name in MODULES or isinstance(node,
                        ast.ImportFrom) and f"{node.module}.{alias.name}" in MODULES)}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if not isinstance(target, ast.Attribute):
                    continue
                assert target.attr != "__class__", f"{module}:{node.lineno} assigns __class__"
                into = target.value.id if isinstance(target.value, ast.Name) else None
                assert into not in module_names or target.attr == "CRASH_AT", \
                    f"{module}:{node.lineno} assigns into module {into}"


def test_every_module_says_what_it_is_in_its_first_line():
    for module in MODULES + [f"{package}.__init__" for package in PACKAGES]:
        doc = ast.get_docstring(ast.parse(source(module).read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"{module} has no docstring that says what it is"


def test_model_loader_imports_without_gguf():
    # A local Hugging Face directory needs no gguf reader: only the bundled models (gguf files) do.
    code = "import sys; sys.modules['gguf'] = None; import model_loader, sampler, mipo, train, eval"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
