from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from lightning_select import IndexedDataset, batch_size_of, get_indices, select_batch
from lightning_select.core.batch import SampleIndex


def test_indexed_dataset_adds_index_to_every_item_kind():
    assert IndexedDataset([{"a": 1}, {"a": 2}])[1] == {"a": 2, "index": 1}
    assert IndexedDataset([(1, 2), (3, 4)])[1] == (3, 4, 1)
    assert IndexedDataset([[1], [2]])[0] == [1, 0]
    assert IndexedDataset([torch.zeros(2)] * 3)[2][1] == 2
    assert IndexedDataset([{"a": 1}], index_key="idx")[0] == {"a": 1, "idx": 0}


def test_indexed_dataset_rejects_existing_key_and_non_map_style():
    with pytest.raises(ValueError, match="already has a key 'index'"):
        IndexedDataset([{"index": 5}])[0]
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter([1, 2]))


def test_get_indices_dict_tuple_and_custom_key():
    assert get_indices({"x": torch.zeros(3), "index": torch.tensor([4, 5, 6])}).tolist() == [4, 5, 6]
    assert get_indices({"id": [1, 2]}, "id").tolist() == [1, 2]
    assert get_indices((torch.zeros(2), SampleIndex([7, 8]))).tolist() == [7, 8]  # marked element
    assert get_indices((torch.zeros(2), torch.tensor([7, 8])), -1).tolist() == [7, 8]  # explicit position
    assert get_indices([torch.tensor([3, 4]), torch.zeros(2)], 0).tolist() == [3, 4]


def test_missing_index_names_the_key_and_the_fix():
    with pytest.raises(KeyError, match=r"no sample-index key 'index'.*IndexedDataset"):
        get_indices({"x": torch.zeros(2)})
    # an unmarked last element is no longer taken as the index (issue 7): it may be the labels
    with pytest.raises(KeyError, match=r"no marked sample indices.*IndexedDataset.*index_key"):
        get_indices((torch.zeros(2), torch.tensor([0, 1])))
    with pytest.raises(KeyError, match="1-d integer tensor"):
        get_indices((torch.zeros(2), torch.zeros(2)), 1)
    with pytest.raises(KeyError, match="Cannot find sample indices"):
        get_indices(torch.zeros(2))


@dataclass
class Pair:
    ids: torch.Tensor
    text: list


def test_select_batch_nested_structures():
    NT = namedtuple("NT", ["a", "b"])
    batch = {
        "x": torch.arange(8.0).view(4, 2),
        "text": ["a", "b", "c", "d"],
        "nested": (torch.arange(4), {"deep": torch.arange(4) * 10}),
        "pair": Pair(torch.arange(4) + 100, ["p", "q", "r", "s"]),
        "nt": NT(torch.arange(4), ["w", "x", "y", "z"]),
        "scalar": torch.tensor(3.0),
        "other_size": torch.zeros(7),
        "name": "config-string",
        "index": torch.tensor([10, 11, 12, 13]),
    }
    rows = torch.tensor([2, 0])
    sub = select_batch(batch, rows)
    assert sub["x"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert sub["text"] == ["c", "a"]
    assert sub["nested"][0].tolist() == [2, 0] and sub["nested"][1]["deep"].tolist() == [20, 0]
    assert sub["pair"].ids.tolist() == [102, 100] and sub["pair"].text == ["r", "p"]
    assert isinstance(sub["nt"], NT) and sub["nt"].b == ["y", "w"]
    assert sub["scalar"].item() == 3.0 and sub["other_size"].shape == (7,) and sub["name"] == "config-string"
    assert sub["index"].tolist() == [12, 10]
    assert batch["text"] == ["a", "b", "c", "d"]  # input untouched


def test_select_batch_tuple_batch_and_empty_selection():
    batch = (torch.arange(5.0), ["a", "b", "c", "d", "e"], torch.arange(5))
    sub = select_batch(batch, torch.tensor([4, 1]))
    assert isinstance(sub, tuple) and sub[1] == ["e", "b"] and sub[2].tolist() == [4, 1]
    empty = select_batch(batch, torch.zeros(0, dtype=torch.long))
    assert empty[0].shape == (0,) and empty[1] == []
    assert batch_size_of(batch) == 5 and batch_size_of({"t": ["a", "b"]}) == 2
