"""The operator's experience of the `many` command line (issue #15): `--version`, a config typo reported in about a
second without torch, `ls` columns and filters, read-only commands that never create a store, and the exit-code
table of README "Running" / docs/design.md §5.4. Real subprocesses where start-up cost or imports are the point."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft")


def python(code: str, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run `python -c code args…` in the project root; (the finished process, its wall seconds, its CPU seconds)."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    started, cpu_before = time.monotonic(), cpu()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**_env(), "PYTHONPATH": str(ROOT)})
    return done, time.monotonic() - started, cpu() - cpu_before


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("MANY_", "PREFECT_", "RAY_"))}


def loaded(modules: tuple[str, ...] = HEAVY) -> str:
    """Python source printing, as the last stdout line, which of `modules` the process has imported."""
    return f"import json, sys; print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"


# -- 1. --version -----------------------------------------------------------------------------------------


def test_version_prints_the_package_version_without_torch() -> None:
    done, seconds, _ = python(f"from flows.cli import main; code = main(['--version']); {loaded()}; sys.exit(code)")
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    import many

    assert lines[0] == f"many {many.__version__}"
    assert json.loads(lines[-1]) == [], f"--version imported {lines[-1]}"
    print(f"many --version: {seconds:.2f} s")


def test_the_version_is_the_distributions() -> None:
    import many

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == many.__version__


# -- 5. config validation loads no torch -------------------------------------------------------------------


def test_the_run_config_and_the_row_registry_import_without_torch() -> None:
    from tasks.rows import BUILT_IN

    modules = ["flows.config", "tasks.rows", *BUILT_IN, "many.merging", "many.merging.config", "many.methods.cram",
               "many.methods.fwd_prompt"]
    done, _, _ = python("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + loaded())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_lazy_packages_still_export_every_name() -> None:
    import many.merging
    import many.methods.cram
    import many.methods.fwd_prompt

    for package in (many.merging, many.methods.cram, many.methods.fwd_prompt):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    from many.merging.registry import CONFIGS
    from many.merging.regmean import RegMeanConfig

    assert CONFIGS["regmean"] is RegMeanConfig  # one class, wherever it is imported from
    with pytest.raises(AttributeError):
        many.methods.cram.no_such_name  # noqa: B018


def test_a_config_typo_is_exit_2_in_about_a_second_without_torch(tmp_path: Path) -> None:
    """The real `main` in a fresh interpreter: one line naming the file and the key, exit 2, no torch, transformers
    or peft loaded (the regression check). The time is bounded in CPU seconds, which a busy machine inflates far
    less than wall seconds: 0.4 s CPU and 1.4-1.7 s wall on 2 cores at load 5, 1.1 s CPU and 5-9 s wall at load 18;
    with torch, transformers and peft it took 13-20 s wall and over 6 s CPU."""
    config = tmp_path / "typo.yaml"
    config.write_text("tasks: [chart-qa]\nfinetune: {stepz: 3}\n")
    store = tmp_path / "store"
    done, seconds, cpu = python(
        f"from flows.cli import main; code = main(['run', '--config', {str(config)!r}, '--store', {str(store)!r}]); "
        f"{loaded()}; sys.exit(code)"
    )
    print(f"config typo: exit {done.returncode} after {seconds:.2f} s wall, {cpu:.2f} s CPU")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"many: error: {config}: finetune.stepz: unknown key"
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert not store.exists()
    assert cpu < 3.0, f"a config typo took {cpu:.1f} s of CPU ({seconds:.1f} s wall) to report (bound: 3 s CPU)"


def test_an_inherited_section_does_not_hide_the_users_key(tmp_path: Path, capsys) -> None:
    """cram.finetune and fwd_prompt inherit the finetune section: its typo is reported once, at the user's key."""
    config = tmp_path / "typo.yaml"
    config.write_text("finetune: {stepz: 3}\n")
    assert main(["run", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"many: error: {config}: finetune.stepz: unknown key"


# -- 2. ls: stage, task, method, key, size, age, seconds, host; filters --------------------------------------


def _manifest(stage: str, key: str, outputs: dict, seconds: float = 1.5):
    from datetime import datetime, timezone

    from tasks.store import Manifest

    return Manifest(stage=stage, key=key, inputs={}, outputs=outputs, config={}, code_version="1", seconds=seconds,
                    host="h0", created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


@pytest.fixture
def listed_store(tmp_path: Path) -> Path:
    """A store of six stages: five listed by run summaries (one of them by an older run only, one relabelled by a
    newer run), one (`finetune` of an unfinished run) by none."""
    import os

    from tasks.store import Store

    root = tmp_path / "store"
    store = Store.open(str(root))
    blob = store.put_bytes(b"x" * 2000)
    stages = [("base", "b" * 64, None, None), ("data", "d" * 64, "chart-qa", None), ("data", "e" * 64, "icon-qa", None),
              ("eval", "1" * 64, "chart-qa", "many"), ("eval", "2" * 64, "chart-qa", "average"),
              ("finetune", "f" * 64, None, None)]
    for stage, key, _, _ in stages:
        store.write_manifest(_manifest(stage, key, {"out": blob}))

    def entry(stage: str, key: str, task: str | None, method: str | None) -> dict:
        return {"stage": stage, "key": key, "task": task, "method": method, "status": "cached", "seconds": 0.1}

    older = [entry(*s) for s in stages[:3]] + [entry("eval", "1" * 64, "old-name", "many")]
    store.write_run("20260101T000000Z-aaaaaa", {"stages": older})
    os.utime(root / "runs" / "20260101T000000Z-aaaaaa.json", (1e9, 1e9))  # older than the next one
    store.write_run("20260102T000000Z-bbbbbb", {"stages": [entry(*s) for s in stages[:2] + stages[3:5]]})
    return root


def test_ls_shows_task_and_method_of_every_stage(listed_store: Path, capsys) -> None:
    assert main(["ls", "--store", str(listed_store)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["stage", "task", "method", "key", "size", "age", "seconds", "host"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("base", "-", "-", "b" * 12),
        ("data", "chart-qa", "-", "d" * 12),
        ("data", "icon-qa", "-", "e" * 12),  # listed by the older run only
        ("eval", "chart-qa", "many", "1" * 12),  # the newest run's name wins
        ("eval", "chart-qa", "average", "2" * 12),
        ("finetune", "-", "-", "f" * 12),  # no finished run lists it
    ]
    assert all(r[4:6] == ["2.0", "kB"] and r[7] == "1.5" and r[8] == "h0" for r in rows), rows
    assert err.strip() == f"6 stages, 12.0 kB in file://{listed_store}"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (["--stage", "eval"], [("eval", "chart-qa", "many"), ("eval", "chart-qa", "average")]),
        (["--task", "chart-qa"], [("data", "chart-qa", None), ("eval", "chart-qa", "many"), ("eval", "chart-qa", "average")]),
        (["--method", "many"], [("eval", "chart-qa", "many")]),
        (["--stage", "eval", "--method", "average"], [("eval", "chart-qa", "average")]),
        (["--task", "no-such-task"], []),
    ],
)
def test_ls_filters_by_stage_task_and_method(filters: list[str], expected: list, listed_store: Path, capsys) -> None:
    assert main(["ls", "--json", "--store", str(listed_store), *filters]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["task"], r["method"]) for r in rows] == expected
    assert all(set(r) == {"stage", "task", "method", "key", "size", "created", "age_seconds", "seconds", "host"} for r in rows)
    assert main(["ls", "--store", str(listed_store), *filters]) == 0
    assert capsys.readouterr().err.strip().startswith(f"{len(expected)} of 6 stages")


def test_ls_skips_a_run_summary_it_cannot_read(listed_store: Path, capsys) -> None:
    (listed_store / "runs" / "broken.json").write_text("{not json")
    assert main(["ls", "--json", "--store", str(listed_store), "--method", "many"]) == 0
    assert [r["task"] for r in json.loads(capsys.readouterr().out)] == ["chart-qa"]


# -- 3, 4. read-only commands never create a store; the exit-code table; no secret in any message -------------

SECRET_KEY_ID, SECRET = "AKIAOPERATORTEST0001", "operator-secret-never-print-me"
UNREACHABLE = "http://someone:hunter2@127.0.0.1:9"  # discard port: connection refused; userinfo must never show


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every S3 client points at an endpoint that refuses connections; one attempt per request (the bounded
    retries are tests/tasks/test_store.py's subject), so a case takes a second, not ten."""
    for name, value in {"AWS_ACCESS_KEY_ID": SECRET_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": UNREACHABLE}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("tasks.store.backend.S3_ATTEMPTS", 1)
    monkeypatch.setattr("tasks.store.backend.S3FS_ROUNDS", 1)
    return "http://***@127.0.0.1:9"


def _garbage_manifest(root: Path) -> None:
    from tasks.store import Store

    Store.open(str(root))
    (root / "stages" / "eval").mkdir(parents=True)
    (root / "stages" / "eval" / f"{'a' * 64}.json").write_text("{torn")


def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


# (case, argv with {missing} {empty} {corrupt} {typo}, fixture-driven setup, exit code, what stderr says)
EXIT_CODES = [
    ("bad_config", ["run", "--config", "{typo}", "--store", "{missing}"], None, 2, "finetune.stepz: unknown key"),
    ("bad_store_url", ["ls", "--store", "ftp://host/x"], None, 2, "unsupported store URL scheme 'ftp'"),
    ("credentials_in_store_url", ["ls", "--store", "s3://AKIA:pw@bucket/x"], None, 2, "never in the store URL"),
    ("missing_store_ls", ["ls", "--store", "{missing}"], None, 2, "no store at {missing}: {missing} does not exist; check --store"),
    ("missing_store_report", ["report", "--store", "{missing}"], None, 2, "no store at {missing}: "),
    ("missing_store_export", ["export", "--store", "{missing}", "--out", "{out}"], None, 2, "no store at {missing}: "),
    ("missing_store_predict", ["predict", "{png}", "q", "--store", "{missing}"], None, 2, "no store at {missing}: "),
    ("unreachable_ls", ["ls", "--store", "s3://many-bucket/x"], "unreachable", 2, "cannot reach bucket 'many-bucket'"),
    ("unreachable_report", ["report", "--store", "s3://many-bucket/x"], "unreachable", 2, "at endpoint http://***@127.0.0.1:9"),
    ("unreachable_export", ["export", "--store", "s3://many-bucket/x", "--out", "{out}"], "unreachable", 2, "127.0.0.1:9"),
    ("unreachable_run", ["run", "--store", "s3://many-bucket/x"], "unreachable", 2, "check store.endpoint_url"),
    ("unreachable_predict", ["predict", "{png}", "q", "--store", "s3://many-bucket/x"], "unreachable", 2, "127.0.0.1:9"),
    ("no_run_yet", ["report", "--store", "{empty}"], None, 1, "no run in store file://{empty} yet"),
    ("corrupt_manifest", ["ls", "--store", "{corrupt}"], None, 1, "is not a valid manifest"),
    ("interrupted", ["ls", "--store", "{empty}"], "interrupt", 130, "many: interrupted"),
]


@pytest.mark.parametrize(("case", "argv", "setup", "code", "message"), EXIT_CODES, ids=[c[0] for c in EXIT_CODES])
def test_exit_codes(case: str, argv: list[str], setup: str | None, code: int, message: str, tmp_path: Path,
                    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """README "Running": 2 for bad input (config, store URL, a store that does not exist for a command that only
    reads — ls, report, export, predict —, an endpoint that does not answer), 1 for runtime failures, 130 on Ctrl-C;
    always one line on stderr that names the store or endpoint and never a credential."""
    from PIL import Image

    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "corrupt": tmp_path / "corrupt",
             "typo": tmp_path / "typo.yaml", "out": tmp_path / "out", "png": tmp_path / "a.png"}
    paths["typo"].write_text("finetune: {stepz: 3}\n")
    Image.new("RGB", (4, 4)).save(paths["png"])
    paths["empty"].mkdir()
    _garbage_manifest(paths["corrupt"])
    if setup == "unreachable":
        request.getfixturevalue("unreachable")
    elif setup == "interrupt":
        monkeypatch.setattr("tasks.store.Store.ls", _interrupt)
    capsys.readouterr()
    assert main([a.format(**paths) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert message.format(**paths) in err, err
    for secret in (SECRET_KEY_ID, SECRET, "hunter2", "someone", "AKIA:pw"):
        assert secret not in err, err
    assert not paths["missing"].exists() and not paths["out"].exists()  # neither created by a failed command


def test_read_only_commands_refuse_a_missing_s3_store(new_bucket: str, tmp_path: Path, capsys) -> None:
    from tasks.store import Store

    assert main(["ls", "--store", f"s3://{new_bucket}/typo"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"many: error: no store at s3://{new_bucket}/typo: nothing is stored under that prefix at endpoint http://")
    Store.open(f"s3://{new_bucket}/real", cache_dir=tmp_path).put_bytes(b"x")
    assert main(["ls", "--store", f"s3://{new_bucket}/real"]) == 0
    assert main(["ls", "--store", f"s3://{new_bucket}/rea"]) == 2  # a prefix of a store's prefix is not a store


def test_run_creates_its_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`many run` is the one writer: a store that does not exist yet is created (the flow itself is stubbed)."""
    seen = {}

    def flow(config, progress, repair):
        seen["store"] = Path(config.store.url)
        return {"run_id": "r", "stages": [], "report": {}, "ray_started": False, "tasks": [], "methods": []}

    monkeypatch.setattr("flows.pipeline.continual_update", flow)
    config = tmp_path / "tiny.yaml"
    config.write_text((ROOT / "examples" / "tiny.yaml").read_text())
    assert main(["run", "--json", "--config", str(config), "--store", str(tmp_path / "new")]) == 0, capsys.readouterr().err
    assert (tmp_path / "new").is_dir() and seen["store"] == tmp_path / "new"
