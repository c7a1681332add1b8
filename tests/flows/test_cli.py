"""Fast tests of the run config and the `many` command line: parsing, defaults and the bad-input table
(each case: the one-line message and the exit code). No Prefect flow and no Ray start here."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main
from flows.config import DEFAULT_METHODS, ConfigError, RunConfig, load_config, parse_config
from many.data import UCIT_ORDER

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_default_config_is_the_mini_ucit_stream_with_every_method() -> None:
    config = RunConfig()
    assert [t.name for t in config.tasks] == list(UCIT_ORDER)
    assert config.methods == DEFAULT_METHODS
    assert config.store.url == "./many-store"
    assert config.resources.finetune.num_gpus == 0


def test_examples_mini_ucit_is_the_built_in_default_written_out() -> None:
    assert load_config(EXAMPLES / "mini-ucit.yaml").model_dump() == RunConfig().model_dump()


def test_bare_task_names_are_mini_ucit_kinds_and_first_n_keeps_the_order() -> None:
    config = parse_config({"tasks": ["chart-qa", {"name": "shapes", "kind": "style-cls"}, "icon-qa"]})
    assert [(t.name, t.kind) for t in config.tasks] == [("chart-qa", "chart-qa"), ("shapes", "style-cls"), ("icon-qa", "icon-qa")]
    assert [t.name for t in config.first(2).tasks] == ["chart-qa", "shapes"]
    with pytest.raises(ConfigError, match="--tasks 4"):
        config.first(4)


def test_json_tasks_run_on_the_tiny_base_and_on_an_hf_base() -> None:
    task = {"name": "vqa", "train_json": "s3://b/train.json", "test_json": "s3://b/test.json", "image_root": "s3://b/img"}
    tiny = parse_config({"tasks": ["chart-qa", task]})  # the tiny base's byte-level tokenizer writes any answer
    assert tiny.base.kind == "tiny" and [t.kind for t in tiny.tasks] == ["chart-qa", None]
    config = parse_config({"tasks": [task], "base": {"kind": "hf", "hf_id": "llava-hf/llava-1.5-7b-hf"}})
    assert config.tasks[0].metric == "exact_match"
    with pytest.raises(ConfigError, match="base.kind 'hf' needs base.hf_id"):
        parse_config({"tasks": [task], "base": {"kind": "hf"}})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    load_config(path)


BAD_CONFIGS = [
    ("unknown_key", "tasks: [chart-qa]\nfinetune: {stepz: 3}\n", "finetune.stepz: unknown key"),
    ("unknown_top_key", "taks: [chart-qa]\n", "taks: unknown key"),
    ("unknown_method", "methods: [many, magic]\n", "methods.1: unknown method 'magic'; known: many,"),
    ("unknown_task_kind", "tasks: [chart-qa, poetry]\n", "unknown task kind 'poetry'"),
    ("malformed_yaml", "tasks: [chart-qa\n", "malformed YAML"),
    ("not_a_mapping", "- chart-qa\n", "must be a YAML mapping"),
    ("wrong_type", "finetune: {steps: many}\n", "finetune.steps: Input should be a valid integer"),
    ("negative", "lpm: {gamma: -1}\n", "lpm.gamma: Input should be greater than or equal to 0"),
    ("duplicate_task", "tasks: [chart-qa, chart-qa]\n", "repeated: ['chart-qa']"),
    ("empty_stream", "tasks: []\n", "the task stream is empty"),
    ("image_size_mismatch", "data: {mini_ucit: {image_size: 16}}\n", "differs from data.mini_ucit.image_size"),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_and_exit_2(case: str, text: str, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert main(["run", "--config", str(path), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert str(path) in err and message in err, err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


BAD_ARGS = [
    ("missing_config", ["run", "--config", "/nonexistent/many.yaml"], "config file not found: /nonexistent/many.yaml"),
    ("bad_scheme", ["run", "--store", "ftp://host/x"], "unsupported store URL scheme 'ftp'"),
    ("bad_bucket", ["run", "--store", "s3://Bad_Bucket/x"], "bad bucket name 'Bad_Bucket'"),
    ("store_is_a_file", ["ls", "--store", "{file}"], "is a file, not a directory"),
    ("tasks_out_of_range", ["run", "--tasks", "9"], "--tasks 9: the stream has 6 tasks"),
    ("tasks_not_a_number", ["run", "--tasks", "two"], "argument --tasks: invalid int value: 'two'"),
    ("unknown_command", ["fly"], "invalid choice: 'fly'"),
    ("export_needs_out", ["export"], "the following arguments are required: --out"),
    ("report_without_run", ["report", "--store", "{empty}"], "no run in store"),
    ("report_without_store", ["report", "--store", "{missing}"], "does not exist; check --store"),
    ("serve_bad_cron", ["serve", "--cron", "every tuesday"], "bad --cron 'every tuesday'"),
]


@pytest.mark.parametrize(("case", "argv", "message"), BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments(case: str, argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    argv = [a.format(file=tmp_path / "file", empty=tmp_path / "empty", missing=tmp_path / "missing") for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    expected = 1 if case == "report_without_run" else 2
    assert code == expected, err
    assert "\n" not in err and "Traceback" not in err
    assert message in err, err


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    assert main(["--debug", "run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_ls_on_an_empty_store(tmp_path: Path, capsys) -> None:  # gc: tests/flows/test_cli_gc.py
    (tmp_path / "s").mkdir()
    assert main(["ls", "--store", str(tmp_path / "s")]) == 0

