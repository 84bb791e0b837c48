"""The one registry pattern: registration, glob listing, unknown names, duplicates refused, in every registry."""

import pytest
import torch

from landscape.analysis.hessian import CURVATURES
from landscape.data import DATASETS, list_datasets
from landscape.errors import LandscapeError
from landscape.export import FORMATS
from landscape.models import MODELS, list_models
from landscape.optimizers import OPTIMIZERS, SAM, create
from landscape.registry import Registry


def test_entries_are_listed_by_glob_in_registration_order_or_sorted():
    fruits = Registry("fruit")
    for name in ("pear", "apple", "peach"):
        fruits.register(name, name.upper())
    assert fruits.names() == ["pear", "apple", "peach"] and list(fruits) == fruits.names() and len(fruits) == 3
    assert fruits.list() == ["PEAR", "APPLE", "PEACH"]
    assert fruits.list("pea*") == ["PEAR", "PEACH"] and fruits.list("?pple") == ["APPLE"]
    assert fruits.list("[ab]*") == ["APPLE"] and fruits.list("plum*") == []
    assert fruits.get("apple") == "APPLE" and "apple" in fruits and "plum" not in fruits and 3 not in fruits
    assert fruits.items() == [("pear", "PEAR"), ("apple", "APPLE"), ("peach", "PEACH")]
    assert Registry("fruit", sort=True).register("b", 1) == 1
    ordered = Registry("fruit", sort=True)
    for name in ("pear", "apple", "peach"):
        ordered.register(name, name)
    assert ordered.list() == ["apple", "peach", "pear"] and ordered.list("p*") == ["peach", "pear"]


def test_decorator_registers_the_decorated_object_and_returns_it():
    hooks = Registry("hook")

    @hooks.register("double")
    def double(x):
        return 2 * x

    assert hooks.get("double") is double and double(2) == 4


def test_canonical_names_apply_to_registration_lookup_and_patterns():
    methods = Registry("method", canonical=lambda name: name.lower().replace("-", ""))
    methods.register("m-rwp", 1)
    assert methods.names() == ["mrwp"] and methods.get("M-RWP") == 1 and methods.list("M-*") == [1]
    with pytest.raises(ValueError, match="method 'mrwp' is registered already"):
        methods.register("MRWP", 2)
    assert methods.get("mrwp") == 1


def test_unknown_name_is_one_line_listing_every_name():
    fruits = Registry("fruit", hint=" or a vegetable")
    fruits.register("pear", 1)
    fruits.register("apple", 2)
    with pytest.raises(LandscapeError) as info:
        fruits.get("plum")
    assert str(info.value) == "unknown fruit 'plum'; use one of pear, apple or a vegetable"
    with pytest.raises(KeyError, match="unknown fruit 'plum'"):
        Registry("fruit", error=KeyError).get("plum")


def test_a_second_registration_is_refused_and_keeps_the_first():
    fruits = Registry("fruit")
    fruits.register("pear", 1)
    with pytest.raises(ValueError, match="fruit 'pear' is registered already; register it under another name"):
        fruits.register("pear", 2)
    with pytest.raises(ValueError, match="registered already"):
        fruits.register("pear")(lambda: None)
    assert fruits.get("pear") == 1 and len(fruits) == 1


def test_every_registry_of_the_package_refuses_a_second_registration():
    from landscape import data, export, models, optimizers

    before = {registry.kind: registry.items() for registry in (MODELS, OPTIMIZERS, DATASETS, FORMATS, CURVATURES)}
    with pytest.raises(ValueError, match="model 'mlp' is registered already"):
        models.register("mlp", "another mlp")(lambda num_classes, input_shape: torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="optimizer 'sam' is registered already"):
        optimizers._register("SAM", "another sam", SAM)
    with pytest.raises(ValueError, match="dataset kind 'npz' is registered already"):
        data.register("npz", "another npz")(lambda spec, path, seed: None)
    with pytest.raises(ValueError, match="export format 'csv' is registered already"):
        export.register("csv", "another csv", ".csv")(lambda results, out: None)
    with pytest.raises(ValueError, match="curvature 'ggn' is registered already"):
        CURVATURES.register("ggn", object)
    assert {registry.kind: registry.items()
            for registry in (MODELS, OPTIMIZERS, DATASETS, FORMATS, CURVATURES)} == before


def test_public_listings_and_unknown_names_of_the_registries():
    assert [info.name for info in list_models("*n*")] == ["cnn", "resnet18", "vgg16bn", "wrn"]
    assert [form for form, _ in list_datasets("cifar*")] == ["cifar10:PATH", "cifar100:PATH"]
    assert [form for form, _ in list_datasets()][-1] == "module:function"
    assert FORMATS.names() == ["tg", "csv", "npz", "vtp"] and CURVATURES.names() == ["hessian", "ggn", "fisher"]
    with pytest.raises(ValueError, match="^unknown optimizer 'lion'; use one of sgd, adamw, sam, .*, ssamd$"):
        create("lion", [torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(LandscapeError, match="^unknown export format 'vtk'; use one of tg, csv, npz, vtp$"):
        FORMATS.get("vtk")
    with pytest.raises(LandscapeError, match="^unknown curvature 'fim'; use one of hessian, ggn, fisher$"):
        CURVATURES.get("fim")
