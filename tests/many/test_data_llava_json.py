"""The UCIT / LLaVA conversation-JSON loader (docs/design.md §7), on a small fixture written into tmp_path."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from PIL import Image

from many.data import DataError, load_llava_json, validate_samples


def _image(colour: tuple[int, int, int], fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 6), colour if mode == "RGB" else colour[0]).save(buffer, format=fmt)
    return buffer.getvalue()


def _record(record_id: str, image: str, *turns: tuple[str, str]) -> dict:
    return {"id": record_id, "image": image, "conversations": [{"from": who, "value": text} for who, text in turns]}


RECORDS = [
    _record("q1", "imgs/red.png", ("human", "<image>\nWhat colour is this?"), ("gpt", "Red")),
    _record("q2", "imgs/blue.jpg", ("human", "Describe it.\n<image>"), ("gpt", " A blue square. ")),
    _record(
        "q3",
        "imgs/gray.png",
        ("human", "<image>\nIs it gray?"),
        ("gpt", "yes"),
        ("human", "And darker?"),
        ("gpt", "no"),
    ),
]


@pytest.fixture()
def ucit(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(_image((255, 0, 0), "PNG"))
    (tmp_path / "imgs" / "blue.jpg").write_bytes(_image((0, 0, 255), "JPEG"))
    (tmp_path / "imgs" / "gray.png").write_bytes(_image((90, 90, 90), "PNG", mode="L"))
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    return tmp_path


def test_loads_first_turns_strips_the_placeholder_and_reencodes_png(ucit: Path) -> None:
    samples = load_llava_json(str(ucit / "train.json"), str(ucit), name="vizwiz")
    assert [(s.sample_id, s.prompt, s.answer) for s in samples] == [
        ("vizwiz/q1", "What colour is this?", "Red"),
        ("vizwiz/q2", "Describe it.", "A blue square."),
        ("vizwiz/q3", "Is it gray?", "yes"),  # multi-turn: the first question and its answer only
    ]
    validate_samples(samples, "vizwiz")  # decodable PNGs
    pixels = [np.asarray(Image.open(io.BytesIO(s.image))) for s in samples]
    assert [p.shape for p in pixels] == [(6, 8, 3)] * 3  # grayscale source becomes RGB
    assert tuple(pixels[0][0, 0]) == (255, 0, 0) and tuple(pixels[2][0, 0]) == (90, 90, 90)
    assert abs(int(pixels[1][0, 0, 2]) - 255) < 8  # JPEG, lossy


def test_without_a_name_ids_are_the_record_ids(ucit: Path) -> None:
    assert [s.sample_id for s in load_llava_json(ucit / "train.json", ucit)] == ["q1", "q2", "q3"]


class PrefixedFS:
    """A filesystem object as an fsspec one is used: only `.open(path, "rb")`, on paths under a fake bucket."""

    def __init__(self, root: Path) -> None:
        self.root, self.opened = root, []

    def open(self, path: str, mode: str) -> BinaryIO:
        assert mode == "rb" and path.startswith("bucket/ucit/")
        self.opened.append(path)
        return open(self.root / path.removeprefix("bucket/ucit/"), mode)


def test_reads_through_a_duck_typed_filesystem(ucit: Path) -> None:
    fs = PrefixedFS(ucit)
    samples = load_llava_json("bucket/ucit/train.json", "bucket/ucit", fs=fs, name="t")
    assert samples == load_llava_json(ucit / "train.json", ucit, name="t")
    opened = ["train.json", "imgs/red.png", "imgs/blue.jpg", "imgs/gray.png"]
    assert fs.opened == [f"bucket/ucit/{path}" for path in opened]


NO_ANSWER = "the first human turn has no gpt answer"
BAD_RECORDS = [
    ("missing image file", [_record("m1", "imgs/absent.png", ("human", "q"), ("gpt", "a"))], "'m1': image file not"),
    ("corrupt image", [_record("c1", "imgs/corrupt.png", ("human", "q"), ("gpt", "a"))], "corrupt image in"),
    ("empty task", [], "empty task: "),
    ("no gpt turn", [_record("g1", "imgs/red.png", ("human", "<image>\nq"))], f"record 'g1': {NO_ANSWER}"),
    ("empty answer", [_record("g2", "imgs/red.png", ("human", "q"), ("gpt", "  "))], f"record 'g2': {NO_ANSWER}"),
    ("human after human", [_record("g3", "imgs/red.png", ("human", "q"), ("human", "r"))], f"'g3': {NO_ANSWER}"),
    ("no human turn", [_record("h1", "imgs/red.png", ("gpt", "a"))], "record 'h1': no human turn"),
    ("placeholder only", [_record("h2", "imgs/red.png", ("human", "<image>"), ("gpt", "a"))], "besides <image>"),
    ("no image key", [{"id": "i1", "conversations": []}], "record 'i1': no 'image' path"),
    ("no conversations", [{"id": "v1", "image": "imgs/red.png"}], "record 'v1': no 'conversations' list"),
    ("not a list", {"id": "x"}, "must hold a JSON list of records, got dict"),
]


@pytest.mark.parametrize(("case", "records", "message"), BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_input_is_named(ucit: Path, case: str, records: object, message: str) -> None:
    (ucit / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (ucit / "bad.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=re.escape(message)) as raised:
        load_llava_json(str(ucit / "bad.json"), str(ucit))
    assert "bad.json" in str(raised.value)


@pytest.mark.parametrize(
    ("case", "path_name", "text", "message"),
    [
        ("missing json", "absent.json", None, "conversation file not found"),
        ("not json", "broken.json", "[{", "is not valid JSON"),
    ],
)
def test_bad_json_files_are_named(ucit: Path, case: str, path_name: str, text: str | None, message: str) -> None:
    if text is not None:
        (ucit / path_name).write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as raised:
        load_llava_json(str(ucit / path_name), str(ucit))
    assert path_name in str(raised.value)
