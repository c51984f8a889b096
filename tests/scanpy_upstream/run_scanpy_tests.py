#!/usr/bin/env python3
"""Run the installed scanpy's own tests (from its sdist), optionally under autozyme.

    python tests/scanpy_upstream/run_scanpy_tests.py --functions normalize_total,log1p
    python tests/scanpy_upstream/run_scanpy_tests.py --functions normalize_total,log1p --with-autozyme
    python tests/scanpy_upstream/run_scanpy_tests.py --functions all -- -x -q

The scanpy version is the installed one (importlib.metadata; 1.11.5 and 1.12.4 are
known). Fetches that version's tests first (fetch_scanpy_tests.py), writes the
offline pbmc3k stand-in (pbmc3k_standin.py), then runs pytest with the current
interpreter under that version's config (pytest-<version>.ini / .toml, derived from
scanpy's own) on the tests mapped to the chosen functions in
FUNCTION_TESTS[<version>], minus everything listed in deselect-<version>.txt (same
deselection with and without autozyme). Arguments after the options (or after
`--`) go to pytest unchanged; a `-k` among them is AND-ed with the deselect
file's `-k` lines. Exits with pytest's exit code. Run from the repo root.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pbmc3k_standin  # noqa: E402
from fetch_scanpy_tests import (  # noqa: E402
    REPO_ROOT,
    SDIST_SHA256,
    check_supported,
    fetch,
    installed_scanpy_version,
    sdist_pytest_config,
)

AUTOZYME_PLUGIN = "autozyme.pytest_plugin"
COMPAT_PLUGIN = "upstream_compat"  # tests/scanpy_upstream/upstream_compat.py
DATASETS_PLUGIN = "offline_datasets"  # tests/scanpy_upstream/offline_datasets.py
DESELECT_CHECK_PLUGIN = "deselect_check"  # tests/scanpy_upstream/deselect_check.py


def config_file(version: str) -> Path:
    """scanpy `version`'s pytest config: pytest-<version>.ini (from an
    [tool.pytest.ini_options] table) or pytest-<version>.toml (from [tool.pytest])."""
    candidates = (HERE / f"pytest-{version}.ini", HERE / f"pytest-{version}.toml")
    found = [p for p in candidates if p.is_file()]
    if len(found) != 1:
        msg = f"expected exactly one pytest-{version}.ini/.toml in {HERE}, found {found}"
        raise SystemExit(msg)
    return found[0]


def deselect_file(version: str) -> Path:
    return HERE / f"deselect-{version}.txt"


# How our per-version config differs from scanpy's own pytest table, and nothing
# else (each config file's header says why): config_drift() checks it every run.
DROPPED_KEYS = frozenset({"testpaths", "junit_family", "norecursedirs"})
DROPPED_ADDOPTS = frozenset({"--doctest-modules", "--pyargs"})
ADDED_MARKERS = {
    "1.11.5": ("flaky: rerun marker from pytest-rerunfailures (not installed here; a no-op)",),
}


def read_config(path: Path) -> dict[str, object]:
    """Our config file's pytest table: TOML values as they are; ini values as pytest
    reads them (a list a line for the list-valued keys, else the string)."""
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(path.read_text())["pytest"]
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(path)
    return {
        k: [line.strip() for line in v.splitlines() if line.strip()]
        if k in {"addopts", "markers", "filterwarnings"}
        else v.strip()
        for k, v in ini["pytest"].items()
    }


def config_drift(version: str) -> list[str]:
    """Differences between our config for `version` and scanpy's own, beyond the
    documented ones; empty when the config is faithful."""
    upstream = {k: v for k, v in sdist_pytest_config(version).items() if k not in DROPPED_KEYS}
    upstream["addopts"] = [a for a in upstream.get("addopts", []) if a not in DROPPED_ADDOPTS]
    upstream["markers"] = [*upstream.get("markers", []), *ADDED_MARKERS.get(version, ())]
    ours = read_config(config_file(version))
    problems = []
    for key in sorted(set(upstream) | set(ours)):
        want, got = upstream.get(key), ours.get(key)
        if isinstance(want, bool):  # an ini file spells it as a string
            want = str(want).lower() if isinstance(got, str) else want
        if want != got:
            problems.append(f"{key}: scanpy {version} has {want!r}, {config_file(version).name} has {got!r}")
    return problems


FUNCTIONS = (
    "normalize_total",
    "log1p",
    "scale",
    "highly_variable_genes",
    "rank_genes_groups",
    "leiden",
)

# Which upstream tests exercise which scanpy function, per scanpy version (the
# versions of fetch_scanpy_tests.SDIST_SHA256). Entries are pytest node ids
# relative to the extracted tree's root (`tests/...`): a whole file, a test
# function (all its parametrizations) or one parametrization. Only tests that
# call the function itself are listed (not tests that merely use it to prepare
# data, except where noted). Tests that cannot run here are removed by
# deselect-<version>.txt, not here.
FUNCTION_TESTS: dict[str, dict[str, tuple[str, ...]]] = {
    "1.11.5": {
        "normalize_total": (
            "tests/test_normalization.py::test_normalize_matrix_types",
            "tests/test_normalization.py::test_normalize_total",
            "tests/test_normalization.py::test_normalize_total_rep",
            "tests/test_normalization.py::test_normalize_total_view",
            "tests/test_preprocessing_distributed.py::test_normalize_total",
        ),
        "log1p": (
            "tests/test_preprocessing.py::test_log1p",
            "tests/test_preprocessing.py::test_log1p_deprecated_arg",
            "tests/test_preprocessing.py::test_log1p_rep",
            "tests/test_backed.py::test_log1p_backed_errors",
            "tests/test_preprocessing_distributed.py::test_log1p",
        ),
        "scale": (
            "tests/test_scaling.py",
            "tests/test_preprocessing.py::test_scale_matrix_types",
            "tests/test_preprocessing.py::test_scale_zero_center_warns_dask_sparse",
            "tests/test_preprocessing.py::test_scale",
            "tests/test_preprocessing.py::test_scale_rep",
            "tests/test_preprocessing.py::test_scale_array",
            # backed_adata ids are swapped upstream: "sparse" is dense, "dense" is CSR
            "tests/test_backed.py::test_backed_error[sparse-scale]",
            "tests/test_backed.py::test_backed_error[dense-scale]",
        ),
        "highly_variable_genes": (
            # also runs normalize_total + log1p as preprocessing in several tests
            "tests/test_highly_variable_genes.py",
        ),
        "rank_genes_groups": (
            "tests/test_rank_genes_groups.py",
            "tests/test_filter_rank_genes_groups.py",
            # t-test / logreg / default method: must fall back, not break
            "tests/test_rank_genes_groups_logreg.py",
            "tests/test_get.py::test_rank_genes_groups_df",
            "tests/test_backed.py::test_backed_error[sparse-rank_genes_groups]",
            "tests/test_backed.py::test_backed_error[dense-rank_genes_groups]",
        ),
        "leiden": (
            "tests/test_clustering.py::test_leiden_basic",
            "tests/test_clustering.py::test_leiden_random_state",
            "tests/test_clustering.py::test_leiden_igraph_directed",
            "tests/test_clustering.py::test_leiden_wrong_flavor",
            "tests/test_clustering.py::test_leiden_igraph_partition_type",
            "tests/test_clustering.py::test_leiden_equal_defaults_same_args",
            "tests/test_clustering.py::test_leiden_equal_defaults",
            "tests/test_clustering.py::test_leiden_objective_function",
            "tests/test_clustering.py::test_clustering_subset[leiden-leiden]",
            "tests/test_clustering.py::test_clustering_custom_key[leiden-leiden-0.8-custom_resolutions0]",
            # leiden with neighbors_key= / obsp= (also runs neighbors, draw_graph, umap, paga)
            "tests/test_neighbors_key_added.py::test_neighbors_key_obsp",
        ),
    },
}
# 1.12.4 has the same tests under the same names, plus the ones 1.12 added; 1.12
# dropped zappy (test_preprocessing_distributed has no [direct]/[dask] ids any
# more) and louvain (test_clustering_* have only the leiden case, so they are
# selected whole).
_LEIDEN_1_12 = tuple(
    node.split("[")[0] if node.startswith("tests/test_clustering.py::test_clustering_") else node
    for node in FUNCTION_TESTS["1.11.5"]["leiden"]
)
FUNCTION_TESTS["1.12.4"] = {
    **FUNCTION_TESTS["1.11.5"],
    "normalize_total": (
        *FUNCTION_TESTS["1.11.5"]["normalize_total"],
        # new in 1.12.4: target_sum=None takes the median over non-empty cells
        "tests/test_normalization.py::test_normalize_total_target_sum_ignores_zero_count_cells",
    ),
    "leiden": _LEIDEN_1_12,
}
if set(FUNCTION_TESTS) != set(SDIST_SHA256) or any(
    tuple(table) != FUNCTIONS for table in FUNCTION_TESTS.values()
):
    msg = "FUNCTION_TESTS needs one table per version of SDIST_SHA256, each over FUNCTIONS"
    raise SystemExit(msg)


def read_deselect(path: Path) -> tuple[list[str], list[str]]:
    """Parse a deselect-<version>.txt into (node-id prefixes, -k expressions).

    One entry a line: a node id (prefix) or `-k EXPRESSION`; `# reason` comments
    and blank lines are ignored. Every entry must carry a reason.
    """
    node_ids: list[str] = []
    keywords: list[str] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        entry, _, reason = raw.partition("#")
        entry = entry.strip()
        if not entry:
            continue
        if not reason.strip():
            msg = f"{path.name}:{lineno}: entry without a `# reason`: {raw!r}"
            raise SystemExit(msg)
        if entry.startswith("-k"):
            expr = entry[2:].strip()
            if len(expr) >= 2 and expr[0] == expr[-1] and expr[0] in "'\"":
                expr = expr[1:-1]
            if not expr:
                msg = f"{path.name}:{lineno}: empty -k expression"
                raise SystemExit(msg)
            keywords.append(expr)
        else:
            node_ids.append(entry)
    return node_ids, keywords


def split_user_k(args: list[str]) -> tuple[list[str], list[str]]:
    """Remove -k options from pytest args; return (remaining args, expressions)."""
    rest: list[str] = []
    exprs: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-k", "--keyword"):
            exprs.append(next(it, ""))
        elif a.startswith("--keyword="):
            exprs.append(a.split("=", 1)[1])
        elif a.startswith("-k") and not a.startswith("--"):
            exprs.append(a[2:])
        else:
            rest.append(a)
    return rest, [e for e in exprs if e.strip()]


def resolve_functions(spec: str) -> list[str]:
    names = [f.strip() for f in spec.split(",") if f.strip()]
    if names == ["all"]:
        return list(FUNCTIONS)
    unknown = [n for n in names if n not in FUNCTIONS]
    if unknown or not names:
        msg = f"unknown function(s) {unknown}; choose from: all, {', '.join(FUNCTIONS)}"
        raise SystemExit(msg)
    return names


def build_command(
    functions: list[str],
    *,
    version: str,
    with_autozyme: bool,
    pytest_args: list[str],
    tests_root: Path,
    datasets_dir: Path,
) -> list[str]:
    rel_root = os.path.relpath(tests_root, Path.cwd())
    nodes: list[str] = []
    for fn in functions:
        for node in FUNCTION_TESTS[version][fn]:
            if node not in nodes:  # pytest would run a repeated id twice
                nodes.append(node)
    targets = [f"{rel_root}/{node}" for node in nodes]

    deselect_ids, deselect_k = read_deselect(deselect_file(version))
    # entries inside the selected tests must each match a test (deselect_check.py)
    expected_deselect = [
        d for d in deselect_ids if any(d.startswith(n) or n.startswith(d) for n in nodes)
    ]
    pytest_args, user_k = split_user_k(pytest_args)
    k_terms = [f"({e})" for e in user_k] + [f"not ({e})" for e in deselect_k]

    cmd = [
        sys.executable, "-m", "pytest",
        "-c", str(config_file(version)),
        f"--rootdir={rel_root}",
        # conftest.py of the extracted tree only; nothing from the repo's own dirs
        f"--confcutdir={rel_root}",
        "-p", "no:randomly",  # keep upstream order deterministic if installed
        # restores an anndata test-helper name scanpy's helpers import (see module)
        "-p", COMPAT_PLUGIN,
        # sc.datasets.pbmc3k() reads the offline stand-in (see offline_datasets.py)
        "-p", DATASETS_PLUGIN,
        f"--scanpy-datasets-from={os.path.relpath(datasets_dir, Path.cwd())}",
        "-p", DESELECT_CHECK_PLUGIN,
        "-rfEs",
    ]  # fmt: skip
    cmd += [f"--expect-deselect={node}" for node in expected_deselect]
    if with_autozyme:
        # Must come after testing.scanpy._pytest (ini addopts), which asserts
        # that scanpy is not imported yet when it loads.
        cmd += ["-p", AUTOZYME_PLUGIN]
    for node in deselect_ids:
        cmd.append(f"--deselect={node}")
    if k_terms:
        cmd += ["-k", " and ".join(k_terms)]
    cmd += pytest_args
    cmd += targets
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Run the installed scanpy's own tests (from its sdist), optionally under autozyme.",
        epilog="Unrecognised arguments (and everything after `--`) are passed to pytest.",
    )
    p.add_argument(
        "--functions",
        default="normalize_total,log1p",
        help=f"comma-separated, or `all` (default: %(default)s); known: {', '.join(FUNCTIONS)}",
    )
    p.add_argument(
        "--with-autozyme",
        action="store_true",
        help=f"load `-p {AUTOZYME_PLUGIN}` and set AUTOZYME_STRICT=1",
    )
    p.add_argument(
        "--no-strict",
        action="store_true",
        help="with --with-autozyme: do not set AUTOZYME_STRICT=1 (fallbacks allowed)",
    )
    p.add_argument(
        "--list-functions",
        action="store_true",
        help="print the installed version's function table and exit",
    )
    p.add_argument(
        "--print-command", action="store_true", help="print the pytest command before running"
    )
    args, pytest_args = p.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]

    version = check_supported(installed_scanpy_version())
    if args.list_functions:
        print(f"scanpy {version}")
        for fn, nodes in FUNCTION_TESTS[version].items():
            print(fn)
            for n in nodes:
                print(f"    {n}")
        return 0

    functions = resolve_functions(args.functions)
    tests_root = fetch(version)
    if drift := config_drift(version):
        print("run_scanpy_tests: the config no longer matches scanpy's own:", *drift, sep="\n  ", file=sys.stderr)
        return 4  # pytest's "usage error" code
    # generated once per version into the test cache, in this process (it imports
    # anndata, never scanpy): pytest's process must not import scanpy this early
    datasets_dir = tests_root / "datasets"
    pbmc3k_standin.ensure(datasets_dir)

    env = os.environ.copy()
    # make upstream_compat.py importable as a plugin
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [env.get("PYTHONPATH")])]
    )
    if args.with_autozyme:
        if find_spec("autozyme") is None:
            print(
                "run_scanpy_tests: --with-autozyme but `autozyme` is not importable "
                f"with {sys.executable}; install pyshim/ first",
                file=sys.stderr,
            )
            return 4  # pytest's "usage error" code
        if not args.no_strict:
            env["AUTOZYME_STRICT"] = "1"
        # neighbors and umap, served by the warm worker, are not among the functions
        # whose tests run here: their calls in these tests run upstream (delegated),
        # rather than a worker warming up beside the run (CI time).
        env.setdefault("AUTOZYME_WARM", "0")
    elif "AUTOZYME_STRICT" in env:
        # irrelevant without the plugin; keep the baseline run clean
        del env["AUTOZYME_STRICT"]

    cmd = build_command(
        functions,
        version=version,
        with_autozyme=args.with_autozyme,
        pytest_args=pytest_args,
        tests_root=tests_root,
        datasets_dir=datasets_dir,
    )
    print(f"run_scanpy_tests: scanpy {version}'s own tests", file=sys.stderr, flush=True)
    if args.print_command:
        strict = " AUTOZYME_STRICT=1" if env.get("AUTOZYME_STRICT") == "1" else ""
        print(f"+{strict} {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    if Path.cwd().resolve() != REPO_ROOT:
        print(
            f"run_scanpy_tests: run from the repo root ({REPO_ROOT}), not {Path.cwd()}",
            file=sys.stderr,
        )
        sys.exit(4)
    sys.exit(main())
