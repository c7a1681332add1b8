"""Bad inputs (issue #9.5): each case names the input, the one-line message expected on stderr, the exit
code (2: bad input; 1 where docs/design.md §5 calls it a runtime failure), and the store listing unchanged.

Config, task-name and store-URL cases fail before any flow starts (fast). Data cases (missing image, empty
task, answerless conversation, not JSON) are found by preflight before anything runs, a corrupt PNG by the data stage
of a real flow, which then cancels the base in flight (slow). A task's own
adapter (`tasks[i].adapter`) with NaNs or shapes that do not fit the base is refused before anything runs;
the merge stage refuses such factors too (defence in depth) and writes no manifest.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tasks.store import Store
from tests.reliability.conftest import SMALL, listing, many, many_env

BAD_CONFIGS = [
    ("malformed_yaml", "tasks: [style-cls\n", "malformed YAML"),
    ("unknown_key", {"finetune": {"stepz": 3}}, "finetune.stepz: unknown key"),
    ("unknown_task_kind", {"tasks": ["style-cls", "poetry"]}, "unknown task kind 'poetry'"),
    ("unknown_method", {"methods": ["many", "magic"]}, "methods.1: unknown method 'magic'; known: many,"),
    ("negative_rank", {"finetune": {"lora": {"rank": -4}}}, "finetune.lora.rank: Input should be greater than 0"),
    ("zero_rank", {"finetune": {"lora": {"rank": 0}}}, "finetune.lora.rank: Input should be greater than 0"),
    ("dotdot_task_name", {"tasks": [{"name": "../../escape", "kind": "style-cls"}]}, "tasks.0.name: String should match pattern"),
    ("absolute_task_name", {"tasks": [{"name": "/etc/passwd", "kind": "style-cls"}]}, "tasks.0.name: String should match pattern"),
    ("slash_task_name", {"tasks": [{"name": "a/b", "kind": "chart-qa"}]}, "tasks.0.name: String should match pattern"),
]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A store with something in it, so "unchanged" is not trivially "still empty"."""
    store = Store.open(str(tmp_path / "store"))
    store.put_bytes(b'{"already": "here"}')
    return tmp_path / "store"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize(("case", "config", "message"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2_store_unchanged(
    case: str, config: str | dict, message: str, store_dir: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump({**SMALL, **config}))
    before = listing(store_dir)
    code, err = run_cli(["run", "--config", str(path), "--store", str(store_dir)], capsys)
    assert (code, message in err, str(path) in err) == (2, True, True), err
    assert listing(store_dir) == before


def test_nonexistent_bucket_is_exit_2(s3_endpoint: str, tmp_path: Path, capsys) -> None:
    code, err = run_cli(["run", "--store", "s3://many-no-such-bucket/x"], capsys)
    assert code == 2 and "bucket 'many-no-such-bucket' does not exist" in err, err


def test_store_root_that_cannot_be_created_is_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["run", "--store", str(tmp_path / "file" / "store")], capsys)
    assert code == 2 and "cannot create store root" in err, err
    assert (tmp_path / "file").read_text() == "x"


def test_unreachable_store_is_one_line_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    """An endpoint that does not answer when `many run` opens its store (after the bounded retries) is a bad
    --store / endpoint: exit 2 before anything runs, the message naming the endpoint (never a credential). The same
    failure inside a run is a runtime one (exit 1)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    code, err = run_cli(["run", "--store", "s3://many-bucket/x"], capsys)
    assert code == 2 and "cannot reach bucket 'many-bucket'" in err and "check store.endpoint_url" in err, err
    assert "at endpoint http://127.0.0.1:9:" in err and "AWS_SECRET" not in err, err


def test_gpu_requested_with_none_present_is_exit_2_before_anything_runs(store_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("flows.preflight.local_gpus", lambda: 0)  # the same answer on a GPU machine
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "resources": {"finetune": {"num_gpus": 1}}}))
    before = listing(store_dir)
    code, err = run_cli(["run", "--config", str(path), "--store", str(store_dir)], capsys)
    assert code == 2 and err == (
        "many: error: resources.finetune.num_gpus is 1 but this machine has 0 GPU(s) for the local Ray cluster; "
        "set resources.finetune.num_gpus: 0 to run it on CPU, or ray.address to join a GPU cluster"), err
    assert listing(store_dir) == before


# -- adapters: a task's own adapter (`tasks[i].adapter`), refused by preflight; the merge stage refuses too ----


@pytest.fixture(scope="module")
def task_and_grams(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A real finetune output dir (PEFT adapter + projector) and its Grams (all tokens, answer positions), from the
    shared tiny base."""
    from many.adapters import save_task
    from many.config import FinetuneConfig, LoraConfig, StatsConfig
    from many.model.load import load_base
    from many.stats import collect_grams, save_grams
    from many.training import finetune
    from tests.conftest import FIXTURE_BASE, make_samples

    out = tmp_path_factory.mktemp("adapter")
    base_dir = tmp_path_factory.getbasetemp() / "bad-input-base"
    if not base_dir.exists():
        from many.model.load import save_base
        from many.model.tiny import build_tiny_llava
        from tests.conftest import FIXTURE_MODEL, FIXTURE_TEXTS

        save_base(*build_tiny_llava(FIXTURE_MODEL, FIXTURE_TEXTS, seed=0), base_dir)
    model, processor = load_base(base_dir, FIXTURE_BASE)
    samples = make_samples(8)
    tuned = finetune(model, processor, samples, FinetuneConfig(lora=LoraConfig(rank=2), steps=2, batch_size=4, warmup_steps=0),
                     progress=False)
    save_task(tuned, out / "task")
    grams = collect_grams(tuned, processor, samples, StatsConfig(), progress=False)
    answer = save_grams(grams.answer, out / "answer.safetensors")
    return out / "task", save_grams(grams.all, out / "gram.safetensors"), answer


def _poison_nan(tensors: dict) -> dict:
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    return tensors


def _wrong_shape(tensors: dict) -> dict:
    import torch

    key = next(k for k in tensors if "lora_A" in k)  # input width ≠ the base layer's (= its Gram's)
    tensors[key] = torch.ones(tensors[key].shape[0], tensors[key].shape[1] + 3)
    return tensors


def _rank_mismatch(tensors: dict) -> dict:
    import torch

    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.ones(tensors[key].shape[0] + 1, tensors[key].shape[1])
    return tensors


BAD_ADAPTERS = [
    ("nan", _poison_nan, "non-finite values (NaN/inf)"),
    ("rank_mismatch", _rank_mismatch, "rank mismatch"),
    ("shape_not_the_base", _wrong_shape, "LPM"),
]


def _projector_nan(task_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = task_dir / "projector.safetensors"
    weights = load_file(str(path))
    weights["linear_1.weight"][0, 0] = float("nan")
    save_file(weights, str(path))


def _damage_adapter(damage):
    def apply(task_dir: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = task_dir / "adapter" / "adapter_model.safetensors"
        save_file(damage(load_file(str(weights))), str(weights))
    return apply


BAD_TASK_DIRS = [
    *[(case, _damage_adapter(damage), message) for case, damage, message in BAD_ADAPTERS[:2]],
    ("shape_not_the_base", _damage_adapter(_wrong_shape), "(out×in) but the base layer is 32×64"),
    ("projector_nan", _projector_nan, "linear_1.weight has non-finite values"),
    ("no_projector", lambda d: (d / "projector.safetensors").unlink(), "no projector.safetensors in"),
]


@pytest.mark.parametrize(("case", "damage", "message"), BAD_TASK_DIRS, ids=[c[0] for c in BAD_TASK_DIRS])
def test_bad_user_adapter_is_one_line_exit_2_store_unchanged(
    case: str, damage, message: str, task_and_grams: tuple[Path, Path, Path], store_dir: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    bad = tmp_path / "task"
    shutil.copytree(task_and_grams[0], bad)
    damage(bad)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "tasks": [{"name": "mine", "kind": "style-cls", "adapter": str(bad)}]}))
    before = listing(store_dir)
    code, err = run_cli(["run", "--config", str(path), "--store", str(store_dir)], capsys)
    assert code == 2 and err.startswith(f"many: error: task 'mine': adapter {bad}: ") and message in err, err
    assert listing(store_dir) == before


@pytest.mark.parametrize(("case", "damage", "message"), BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapter_is_refused_by_the_merge_stage_and_no_manifest_is_written(
    case: str, damage, message: str, task_and_grams: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from many.config import LPMConfig
    from tasks.cache import run_stage
    from tasks.catalog import stage_def
    from tasks.rows.many import compute_merge

    task_dir, grams, answer = task_and_grams
    bad = tmp_path / "task"
    shutil.copytree(task_dir, bad)
    weights = bad / "adapter" / "adapter_model.safetensors"
    save_file(damage(load_file(str(weights))), str(weights))
    store = Store.open(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    inputs = {"finetune": store.put(bad), "grams": store.put(grams), "answer_grams": store.put(answer)}
    before = listing(tmp_path / "store")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        run_stage(store, stage_def("merge", inputs), LPMConfig(), inputs,
                  lambda local, workdir: compute_merge(local, workdir, config=LPMConfig(), device="cpu"))
    assert "\n" not in str(error.value)
    assert listing(tmp_path / "store") == before


# -- data: the data stage of a real flow (slow) ----------------------------------------------------------


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _record(i: int, answer: str | None = "red", image: str = "ok.png") -> dict:
    turns = [{"from": "human", "value": "<image>\nwhat colour is the shape?"}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return {"id": f"r{i}", "image": image, "conversations": turns}


BAD_DATA = [  # (case, the train file's records or text, message, found by preflight before anything runs)
    ("missing_image", [_record(0), _record(1, image="absent.png")], "image file not found", True),
    ("corrupt_png", [_record(0), _record(1, image="corrupt.png")], "corrupt image", False),  # decoding finds it
    ("empty_dataset", [], "empty task", True),
    ("answerless_conversation", [_record(0), _record(1, answer=None)], "has no gpt answer", True),
    ("not_json", "[{oops", "is not valid JSON", True),
]
# the slowed base of test_a_bad_task_cancels_the_base_in_flight: far beyond any failure
BASE_SLEEP_SECONDS = int(os.environ.get("MANY_TEST_BASE_SLEEP", "600"))


def _bad_data_config(tmp_path: Path, records: list | str, base: str) -> Path:
    """A one-task JSON stream whose train file holds `records` (a list, or raw text), test file two good records."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / "ok.png").write_bytes(_png())
    (images / "corrupt.png").write_bytes(_png()[:40] + b"\x00garbage")
    (tmp_path / "bad.json").write_text(records if isinstance(records, str) else json.dumps(records))
    (tmp_path / "good.json").write_text(json.dumps([_record(0), _record(1)]))
    task = {"name": "vqa", "train_json": str(tmp_path / "bad.json"), "test_json": str(tmp_path / "good.json"),
            "image_root": str(images)}
    config = {"tasks": [task], "methods": ["individual"], "base": {"kind": "hf", "hf_id": base},
              "finetune": SMALL["finetune"], "ray": SMALL["ray"], "retries": 0}
    path = tmp_path / "bad-data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


PREFLIGHT_DATA = [case[:3] for case in BAD_DATA if case[3]]


@pytest.mark.parametrize(("case", "records", "message"), PREFLIGHT_DATA, ids=[c[0] for c in PREFLIGHT_DATA])
def test_bad_data_is_refused_before_anything_runs(
    case: str, records: list | str, message: str, store_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """What the data stage would find after the base (minutes on the default config) is found by preflight in
    about a second, before Prefect starts: one line naming the task and the problem, the store unchanged."""
    import time

    monkeypatch.setattr("flows.pipeline.continual_update", lambda *a, **k: pytest.fail("the flow started"))
    path = _bad_data_config(tmp_path, records, base=str(tmp_path / "no-base-needed"))
    before = listing(store_dir)
    started = time.monotonic()
    code, err = run_cli(["run", "--config", str(path), "--store", str(store_dir)], capsys)
    seconds = time.monotonic() - started
    print(f"{case}: exit {code} after {seconds:.2f} s")
    assert code == 2 and err.startswith("many: error: task 'vqa': ") and message in err, err
    assert listing(store_dir) == before
    assert seconds < 10, f"preflight took {seconds:.1f} s"


def test_bad_data_on_s3_is_refused_before_anything_runs(new_bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    """An S3 image root is listed once (not one request per image); a missing image is named by its URL."""
    import boto3

    from flows.config import parse_config
    from flows.preflight import PreflightError, check_data

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=new_bucket, Key="vqa/images/ok.png", Body=_png())
    s3.put_object(Bucket=new_bucket, Key="vqa/good.json", Body=json.dumps([_record(0), _record(1)]).encode())
    bad = [_record(0), _record(1, image="absent.png")]
    s3.put_object(Bucket=new_bucket, Key="vqa/bad.json", Body=json.dumps(bad).encode())

    def config(train: str):
        task = {"name": "vqa", "train_json": f"s3://{new_bucket}/vqa/{train}",
                "test_json": f"s3://{new_bucket}/vqa/good.json", "image_root": f"s3://{new_bucket}/vqa/images"}
        return parse_config({"tasks": [task], "base": {"kind": "hf", "hf_id": "x"}})

    check_data(config("good.json"))
    with pytest.raises(PreflightError, match=rf"^task 'vqa': s3://{new_bucket}/vqa/bad.json, record 'r1': image file not "
                                              rf"found: s3://{new_bucket}/vqa/images/absent.png; check image_root"):
        check_data(config("bad.json"))


@pytest.mark.slow
@pytest.mark.parametrize(("case", "records", "message", "by_preflight"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_fails_fast_with_exit_2(
    case: str, records: list | str, message: str, by_preflight: bool, tiny_base_dir: Path, tmp_path: Path
) -> None:
    """The real command: exit 2, the last line names the task and the problem; no run summary. A case preflight
    finds starts no stage at all (the base is not even looked up); a corrupt image is found by the data stage,
    beside a base that may finish (this one takes seconds; test_a_bad_task_cancels_the_base_in_flight slows it)."""
    import time

    path = _bad_data_config(tmp_path, records, base=str(tiny_base_dir))
    store_dir = tmp_path / "store"
    env = many_env(tmp_path)  # before the clock: the first call migrates a Prefect database
    started = time.monotonic()
    outcome = many(["run", "--json", "--config", str(path), "--store", str(store_dir)], env)
    seconds = time.monotonic() - started
    print(f"{case}: exit {outcome.code} after {seconds:.1f} s")
    assert outcome.code == 2 and outcome.last_line.startswith("many: error: task 'vqa': "), outcome.err
    assert message in outcome.last_line and "Traceback" not in outcome.err, outcome.err
    stages = {p.parent.name for p in (store_dir / "stages").glob("*/*.json")}
    assert not (store_dir / "runs").exists()
    if by_preflight:
        assert stages == set() and " running " not in outcome.err and " cached " not in outcome.err, outcome.err
        assert seconds < 120, f"{case}: preflight's refusal took {seconds:.0f} s"
    else:
        assert stages <= {"base"}


@pytest.mark.slow
def test_a_bad_task_cancels_the_base_in_flight(tiny_base_dir: Path, tmp_path: Path, harness, monkeypatch) -> None:
    """A data stage that fails with bad input while the base is still computing fails the run at once: the flow
    stops waiting, cancels the base's Ray task and raises the data error; no base manifest, no run summary. The base
    is slowed to BASE_SLEEP_SECONDS in every Ray worker (tests/reliability/slow_base.py); the corrupt image is only
    found by decoding it, in the data stage (preflight checks that images exist, not their bytes)."""
    import logging
    import os
    import time

    import ray

    from flows.config import load_config
    from flows.pipeline import continual_update
    from many.data import DataError

    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.reliability.slow_base.install",
                          "env_vars": {"MANY_SLOW_BASE_SECONDS": str(BASE_SLEEP_SECONDS)}})
    try:
        path = _bad_data_config(tmp_path, [_record(0), _record(1, image="corrupt.png")], base=str(tiny_base_dir))
        config = load_config(path).model_copy(update={"store": load_config(path).store.model_copy(
            update={"url": str(tmp_path / "store")})})
        started = time.monotonic()
        with pytest.raises(DataError, match=r"^task 'vqa': .*corrupt image"):
            continual_update(config, progress=True)
        seconds = time.monotonic() - started
        print(f"the bad task failed the run after {seconds:.1f} s (the base would take {BASE_SLEEP_SECONDS} s)")
        assert seconds < BASE_SLEEP_SECONDS / 4
        assert not list((tmp_path / "store" / "stages").glob("base/*.json"))
        assert not (tmp_path / "store" / "runs").exists()
    finally:
        ray.shutdown()
