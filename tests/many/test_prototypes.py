"""Visual prototypes: the frozen tower's pooled features and their Parquet table (docs/design.md §1 CPM)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from many import cpm
from many.model.chat import decode_image
from many.prototypes import image_features, prototype_table, read_prototypes, write_prototypes
from tests.conftest import FIXTURE_MODEL, make_samples


def test_features_are_the_mean_projector_input_in_sample_order(tiny_base):
    model, processor = tiny_base
    samples = make_samples(5, seed=3)
    features = image_features(model, processor, samples, batch_size=2)
    assert features.shape == (5, FIXTURE_MODEL.vision_hidden) and features.dtype == torch.float32
    pixels = processor.image_processor([decode_image(s) for s in samples], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        expected = hidden[model.config.vision_feature_layer][:, 1:].mean(dim=1)  # the tokens the projector reads
    torch.testing.assert_close(features, expected)


def test_table_schema_and_prototype_row(tiny_base, tmp_path):
    model, processor = tiny_base
    samples = make_samples(4, seed=4)
    features = image_features(model, processor, samples)
    path = write_prototypes(prototype_table("colours", samples, features), tmp_path / "prototypes.parquet")
    table = pq.read_table(path)
    dim = features.shape[1]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert [table.schema.field(c).type for c in ("task", "sample_id", "kind")] == [pa.string()] * 3
    frame = table.to_pydict()  # plain Python values, no `many` needed to read it
    assert frame["kind"] == ["image"] * 4 + ["prototype"]
    assert frame["sample_id"] == [s.sample_id for s in samples] + [None]
    assert set(frame["task"]) == {"colours"}
    rows = torch.tensor(frame["embedding"])
    torch.testing.assert_close(rows[:4], features)
    torch.testing.assert_close(rows[4], cpm.prototype(features))


def test_read_prototypes_orders_tasks_and_splits_features(tiny_base, tmp_path):
    model, processor = tiny_base
    first, second = make_samples(3, seed=5), make_samples(2, "shape", seed=6)
    f1, f2 = image_features(model, processor, first), image_features(model, processor, second)
    path = write_prototypes(prototype_table("b-task", first, f1), tmp_path / "b.parquet")
    tasks, prototypes, features = read_prototypes([path, prototype_table("a-task", second, f2)])
    assert tasks == ("b-task", "a-task")
    torch.testing.assert_close(prototypes, torch.stack([cpm.prototype(f1), cpm.prototype(f2)]))
    torch.testing.assert_close(features[0], f1)
    torch.testing.assert_close(features[1], f2)


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("wrong_rows", r"expected \(3, D\)"),
        ("duplicate_task", "has 2 prototype rows"),
        ("mixed_dims", r"disagree on D: \[4, 8\]"),
        ("no_tables", "no prototype tables"),
        ("no_samples", "no samples"),
    ],
)
def test_bad_input(tiny_base, case, error):
    model, processor = tiny_base
    samples = make_samples(3, seed=7)
    features = torch.randn(3, 8)
    with pytest.raises(ValueError, match=error):
        if case == "wrong_rows":
            prototype_table("t", samples, features[:2])
        elif case == "duplicate_task":
            read_prototypes([prototype_table("t", samples, features)] * 2)
        elif case == "mixed_dims":
            read_prototypes([prototype_table("t", samples, features), prototype_table("u", samples, torch.randn(3, 4))])
        elif case == "no_tables":
            read_prototypes([])
        else:
            image_features(model, processor, ())
