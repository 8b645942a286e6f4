"""sidfast.conditions: a condition in guidance.guided's form (labels alone, or keywords with the labels as
"class_labels") and split back; conditions moved between devices."""
import torch

from sidfast.conditions import joined, split, to_device


def test_joined_and_split_are_inverse():
    labels = torch.eye(3)[:2]
    cond = {"encoder_hidden_states": torch.zeros(2, 4, 8)}
    assert joined(labels, {}) is labels
    both = joined(labels, cond)
    assert set(both) == {"encoder_hidden_states", "class_labels"} and both["class_labels"] is labels
    assert "class_labels" not in cond  # the keywords given are not changed
    got_labels, got_cond = split(both)
    assert got_labels is labels and got_cond.keys() == cond.keys()
    assert joined(None, cond) == cond and split(joined(None, cond)) == (None, cond)
    assert split(labels) == (labels, {}) and split(None) == (None, {})


def test_to_device_moves_tensors_in_nested_dicts_and_keeps_other_values():
    cond = {"a": torch.ones(2, dtype=torch.float64), "b": {"c": torch.zeros(1)}, "flag": 3}
    moved = to_device(cond, torch.device("cpu"))
    assert torch.equal(moved["a"], cond["a"]) and torch.equal(moved["b"]["c"], cond["b"]["c"])
    assert moved["flag"] == 3 and to_device(None, "cpu") is None
