import copy
import pickle
import re

import pytest
import torch
from torch import nn

from curvkit.core.groups import REQUIRED, normalize_param_groups, parameter_names


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def ids(params):
    return [id(p) for p in params]


def test_none_gives_one_group_of_all_params_requiring_grad_in_model_order(model):
    model[0].bias.requires_grad_(False)
    groups = normalize_param_groups(None, model, {"lr": 0.1})
    assert len(groups) == 1
    assert ids(groups[0]["params"]) == ids([model[0].weight, model[2].weight, model[2].bias])
    assert groups[0]["lr"] == 0.1


def test_none_without_params_requiring_grad_is_refused(model):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        normalize_param_groups(None, model, {})


def test_none_without_model_is_refused():
    with pytest.raises(ValueError, match="no model"):
        normalize_param_groups(None, None, {})


def test_iterable_of_tensors_is_one_group_and_generators_are_accepted(model):
    for given in (list(model.parameters()), model.parameters(), iter(model.parameters())):
        groups = normalize_param_groups(given, model, {})
        assert len(groups) == 1
        assert ids(groups[0]["params"]) == ids(model.parameters())
        assert isinstance(groups[0]["params"], list)


def test_dict_groups_fill_defaults_and_preserve_options_and_order(model):
    criterion = nn.MSELoss()
    user_groups = [
        {"params": [model[2].bias, model[0].weight], "criterion": criterion},
        {"params": (p for p in (model[2].weight,)), "lr": 2.0},
    ]
    original = copy.copy(user_groups[0])
    groups = normalize_param_groups(user_groups, model, {"lr": 0.5, "criterion": None})

    assert ids(groups[0]["params"]) == ids([model[2].bias, model[0].weight])
    assert groups[0]["criterion"] is criterion
    assert groups[0]["lr"] == 0.5
    assert ids(groups[1]["params"]) == ids([model[2].weight])
    assert groups[1]["lr"] == 2.0
    assert groups[1]["criterion"] is None
    assert list(groups[0]) == ["params", "criterion", "lr"]
    # The user's dicts are left alone.
    assert user_groups[0] == original
    assert groups[0] is not user_groups[0]


def test_a_single_dict_is_one_group(model):
    groups = normalize_param_groups({"params": model.parameters(), "lr": 1.0}, model, {"lr": 0.1})
    assert len(groups) == 1
    assert ids(groups[0]["params"]) == ids(model.parameters())
    assert groups[0]["lr"] == 1.0


def test_a_single_tensor_as_params_of_a_group_is_accepted(model):
    groups = normalize_param_groups([{"params": model[0].weight}], model, {})
    assert ids(groups[0]["params"]) == [id(model[0].weight)]


def test_parameters_are_identified_by_identity_not_value():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    # Equal values, distinct tensors: no duplicates.
    groups = normalize_param_groups(
        [{"params": [model[0].weight]}, {"params": [model[1].weight]}], model, {}
    )
    assert ids(p for group in groups for p in group["params"]) == ids(
        [model[0].weight, model[1].weight]
    )
    # A copy equal in value is not the model's parameter.
    clone = nn.Parameter(model[0].weight.detach().clone())
    with pytest.raises(ValueError, match="not a parameter of the model"):
        normalize_param_groups([clone], model, {})


def test_without_a_model_membership_is_not_checked():
    free = torch.zeros(3, requires_grad=True)
    groups = normalize_param_groups([free], None, {"lr": 1})
    assert groups == [{"params": [free], "lr": 1}]


def test_empty_defaults_may_be_omitted(model):
    groups = normalize_param_groups(None, model)
    assert list(groups[0]) == ["params"]


def test_required_option_must_be_set(model):
    criterion = nn.MSELoss()
    groups = normalize_param_groups(
        [{"params": [model[0].weight], "criterion": criterion}], model, {"criterion": REQUIRED}
    )
    assert groups[0]["criterion"] is criterion
    message = "group 1 does not set the option 'criterion', which has no default"
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_param_groups(
            [
                {"params": [model[0].weight], "criterion": criterion},
                {"params": [model[2].weight]},
            ],
            model,
            {"criterion": REQUIRED},
        )


def test_required_survives_pickle_and_deepcopy():
    assert pickle.loads(pickle.dumps(REQUIRED)) is REQUIRED
    assert copy.deepcopy(REQUIRED) is REQUIRED
    assert repr(REQUIRED) == "<required option>"


def test_unknown_option_is_refused_with_a_suggestion(model):
    with pytest.raises(ValueError, match=r"unknown option 'lrr' \(known options: 'lr'\)"):
        normalize_param_groups([{"params": [model[0].weight], "lrr": 1}], model, {"lr": 0.1})
    with pytest.raises(ValueError, match="Did you mean 'lr'"):
        normalize_param_groups([{"params": [model[0].weight], "lrr": 1}], model, {"lr": 0.1})
    with pytest.raises(ValueError, match=r"known options: none"):
        normalize_param_groups([{"params": [model[0].weight], "lr": 1}], model, {})


def test_params_key_in_defaults_is_refused(model):
    with pytest.raises(ValueError, match="defaults must not contain 'params'"):
        normalize_param_groups(None, model, {"params": []})


def test_missing_params_is_refused(model):
    with pytest.raises(ValueError, match="group 1 has no 'params' key"):
        normalize_param_groups([{"params": [model[0].weight]}, {"lr": 1}], model, {"lr": 0})


def test_empty_params_is_refused(model):
    with pytest.raises(ValueError, match="'params' of group 0 is empty"):
        normalize_param_groups([{"params": []}], model, {})
    with pytest.raises(ValueError, match="'params' of group 0 is empty"):
        normalize_param_groups([{"params": iter([])}], model, {})


def test_empty_param_groups_is_refused(model):
    with pytest.raises(ValueError, match="param_groups is empty"):
        normalize_param_groups([], model, {})
    with pytest.raises(ValueError, match="param_groups is empty"):
        normalize_param_groups(iter([]), model, {})


def test_parameter_in_two_groups_is_refused(model):
    message = (
        "parameter at position 1 of group 1 ('0.weight') is also in group 0 (at position 0): "
        "a parameter may belong to one group only"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_param_groups(
            [{"params": [model[0].weight]}, {"params": [model[2].weight, model[0].weight]}],
            model,
            {},
        )


def test_parameter_twice_in_one_group_is_refused(model):
    message = (
        "parameter at position 2 of group 0 ('2.bias') is also at position 0 of the same group: "
        "list each parameter once"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_param_groups([model[2].bias, model[0].weight, model[2].bias], model, {})


def test_parameter_not_in_model_is_refused(model):
    other = nn.Linear(3, 4)
    message = (
        "parameter at position 1 of group 0, of shape (4, 3), is not a parameter of the model "
        "(Sequential): pass tensors from model.parameters()"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_param_groups([model[0].weight, other.weight], model, {})


def test_tensor_not_requiring_grad_is_refused(model):
    model[2].bias.requires_grad_(False)
    message = (
        "parameter at position 0 of group 1 ('2.bias') does not require grad: leave it out, "
        "or set requires_grad=True"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_param_groups(
            [{"params": [model[0].weight]}, {"params": [model[2].bias]}], model, {}
        )
    with pytest.raises(ValueError, match="does not require grad"):
        normalize_param_groups([torch.zeros(2)], None, {})


def test_non_tensor_parameter_is_refused(model):
    with pytest.raises(TypeError, match="position 1 of group 0 is a float, not a tensor"):
        normalize_param_groups([{"params": [model[0].weight, 1.0]}], model, {})


def test_single_tensor_as_param_groups_is_refused(model):
    with pytest.raises(TypeError, match=r"single tensor: pass an iterable of tensors, e.g. \["):
        normalize_param_groups(model[0].weight, model, {})


def test_wrong_param_groups_type_is_refused(model):
    for bad in (3, "params"):
        with pytest.raises(TypeError, match="param_groups must be None, an iterable"):
            normalize_param_groups(bad, model, {})


def test_mixing_dicts_and_tensors_is_refused(model):
    with pytest.raises(TypeError, match="mixes dicts and other entries"):
        normalize_param_groups([{"params": [model[0].weight]}, model[2].weight], model, {})


def test_named_parameters_are_refused_with_a_hint(model):
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs: pass model.parameters\(\)"):
        normalize_param_groups(model.named_parameters(), model, {})


def test_set_of_params_is_refused(model):
    with pytest.raises(TypeError, match="is a set, whose order is not reproducible"):
        normalize_param_groups([{"params": {model[0].weight}}], model, {})


def test_wrong_params_type_is_refused(model):
    with pytest.raises(TypeError, match="'params' of group 0 must be a tensor or an iterable"):
        normalize_param_groups([{"params": 3}], model, {})


def test_parameter_names_are_qualified_and_shared_parameters_named_once():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    names = parameter_names(model)
    assert names == {id(shared.weight): "0.weight", id(shared.bias): "0.bias"}
