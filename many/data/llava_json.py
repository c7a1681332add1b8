"""Real UCIT data (docs/design.md §7): LLaVA conversation JSON plus an image folder, local or remote.

    [{"id": "…", "image": "relative/path.jpg",
      "conversations": [{"from": "human", "value": "<image>\\n…"}, {"from": "gpt", "value": "…"}, …]}, …]

Each record becomes one single-turn Sample: its FIRST human turn (the `<image>` placeholder removed) and the gpt
turn that follows it. UCIT's records are single-turn; later turns of a multi-turn record depend on the earlier
answers, which a single-turn Sample cannot carry, so they are dropped rather than expanded out of context.
Images are re-encoded as upright (EXIF orientation applied) RGB PNG. `fs` is any object with `.open(path, "rb")`
(an fsspec filesystem, duck-typed); by default the local filesystem."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from PIL import ImageOps

from many.data.draw import png_bytes
from many.data.schema import Sample
from many.data.validate import DataError, decode_image

IMAGE_PLACEHOLDER = "<image>"


class FileSystem(Protocol):
    def open(self, path: str, mode: str) -> BinaryIO: ...


class _Local:
    def open(self, path: str, mode: str) -> BinaryIO:
        return open(path, mode)


def _first_turn(record: dict[str, Any], where: str) -> tuple[str, str]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise DataError(f"{where}: no 'conversations' list of turns; each record needs human and gpt turns")
    for k, turn in enumerate(turns):
        if turn.get("from") == "human":
            reply = turns[k + 1] if k + 1 < len(turns) else {}
            answer = str(reply.get("value", "")).strip() if reply.get("from") == "gpt" else ""
            if not answer:
                raise DataError(f"{where}: the first human turn has no gpt answer (missing or empty); add the answer")
            prompt = str(turn.get("value", "")).replace(IMAGE_PLACEHOLDER, "").strip()
            if not prompt:
                raise DataError(
                    f"{where}: the first human turn has no text besides {IMAGE_PLACEHOLDER}; add the instruction"
                )
            return prompt, answer
    raise DataError(f"{where}: no human turn in 'conversations'; each record needs a question")


def missing_image(where: str, path: str) -> DataError:
    """The error of a record whose image does not exist (the data stage and flows/preflight.py say the same)."""
    return DataError(f"{where}: image file not found: {path}; check image_root and the record's 'image'")


def _image(fs: FileSystem, path: str, where: str) -> bytes:
    try:
        with fs.open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError as error:
        raise missing_image(where, path) from error
    # phone photos (VizWiz) store their rotation in EXIF: apply it so the pixels are upright
    return png_bytes(ImageOps.exif_transpose(decode_image(data, f"{where}, image {path}")))


def _records(json_path: str | Path, fs: FileSystem) -> list[Any]:
    try:
        with fs.open(str(json_path), "rb") as file:
            records = json.loads(file.read())
    except FileNotFoundError as error:
        raise DataError(f"conversation file not found: {json_path}; check the task's json path") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{json_path} is not valid JSON ({error}); fix or re-export the file") from error
    if not isinstance(records, list):
        raise DataError(f"{json_path} must hold a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"empty task: {json_path} has no records; check the file or the task's split")
    return records


def _record(record: Any, k: int, json_path: str | Path) -> tuple[str, str, str, str, str]:
    """(id, where, image path relative to the image root, prompt, answer) of one record, or DataError."""
    record_id = str(record.get("id", k)) if isinstance(record, dict) else str(k)
    where = f"{json_path}, record {record_id!r}"
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise DataError(f"{where}: no 'image' path; every record needs an image")
    prompt, answer = _first_turn(record, where)
    return record_id, where, record["image"], prompt, answer


def check_llava_json(json_path: str | Path, *, fs: FileSystem | None = None) -> list[tuple[str, str]]:
    """Everything `load_llava_json` checks except the images themselves: the file parses, holds records, each
    with an image path and a first human turn answered by gpt. Returns (where, image path relative to the image
    root) per record, for a caller that checks the images exist more cheaply than by reading them
    (flows/preflight.py)."""
    checked = []
    for k, record in enumerate(_records(json_path, fs or _Local())):
        _, where, image_path, _, _ = _record(record, k, json_path)
        checked.append((where, image_path))
    return checked


def load_llava_json(
    json_path: str | Path, image_root: str | Path, *, fs: FileSystem | None = None, name: str | None = None
) -> tuple[Sample, ...]:
    """Samples of one LLaVA JSON file; sample ids are `<name>/<id>` (just `<id>` without a name)."""
    fs = fs or _Local()
    samples = []
    for k, record in enumerate(_records(json_path, fs)):
        record_id, where, image_path, prompt, answer = _record(record, k, json_path)
        image = _image(fs, posixpath.join(str(image_root), image_path), where)
        samples.append(Sample(f"{name}/{record_id}" if name else record_id, image, prompt, answer))
    return tuple(samples)
