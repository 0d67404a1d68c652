"""Spec files: Python modules with constants, JSON files, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdet import specs
from fdet.specs import SpecError


def test_load_python_file(tmp_path: Path) -> None:
    f = tmp_path / "tiny.py"
    f.write_text(
        "from fdet import specs\n"
        "MODEL = specs.RetinaNet(head=specs.RetinaHead(num_classes=2))\n"
        "OTHER = specs.FPN(channels=64)\n"
    )
    assert specs.load(f).num_classes == 2
    assert specs.load(f, name="OTHER") == specs.FPN(channels=64)
    assert specs.load(f, specs.RetinaNet).head.num_classes == 2
    with pytest.raises(SpecError, match="holds a FPN, expected a RetinaNet"):
        specs.load(f, specs.RetinaNet, name="OTHER")


def test_load_json_file_round_trip(tmp_path: Path) -> None:
    spec = specs.RetinaNet(head=specs.RetinaHead(num_classes=5), box_loss=specs.GIoULoss())
    f = tmp_path / "spec.json"
    f.write_text(specs.to_json(spec))
    assert specs.load(f) == spec


def test_load_json_error_names_file_and_path(tmp_path: Path) -> None:
    data = specs.to_json(specs.RetinaNet(head=specs.RetinaHead(num_classes=5)))
    f = tmp_path / "spec.json"
    f.write_text(data.replace('"num_convs"', '"num_conv"'))
    with pytest.raises(SpecError) as info:
        specs.load(f)
    assert str(info.value).startswith(f"{f}: head.num_conv: unknown key in RetinaHead")


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.py"):
        specs.load(tmp_path / "nothere.py")
    with pytest.raises(FileNotFoundError, match=r"nothere\.json"):
        specs.load(tmp_path / "nothere.json")
    (tmp_path / "spec.yaml").write_text("a: 1")
    with pytest.raises(SpecError, match=r"use \.py or \.json"):
        specs.load(tmp_path / "spec.yaml")


def test_python_file_without_spec_constants(tmp_path: Path) -> None:
    f = tmp_path / "empty.py"
    f.write_text("from fdet import specs\nHEAD = specs.RetinaHead(num_classes=1)\nX = 3\n")
    with pytest.raises(SpecError, match=r"defines none of EXPERIMENT, MODEL.*HEAD"):
        specs.load(f)
    g = tmp_path / "notspec.py"
    g.write_text("MODEL = {'type': 'RetinaNet'}\n")
    with pytest.raises(SpecError, match="MODEL is a dict, not a spec"):
        specs.load(g)


def test_invalid_spec_in_file_raises_at_load(tmp_path: Path) -> None:
    f = tmp_path / "bad.py"
    f.write_text("from fdet import specs\nMODEL = specs.RetinaHead(num_classes=0)\n")
    with pytest.raises(SpecError, match="num_classes: must be > 0"):
        specs.load(f)


def test_derived_file_imports_its_base(tmp_path: Path) -> None:
    (tmp_path / "base.py").write_text(
        "from fdet import specs\nMODEL = specs.RetinaNet(head=specs.RetinaHead(num_classes=2))\n"
    )
    (tmp_path / "derived.py").write_text(
        "from pathlib import Path\nimport attrs\nfrom fdet.specs import load_module\n"
        "BASE = load_module(Path(__file__).with_name('base.py'))\n"
        "MODEL = attrs.evolve(BASE.MODEL, backbone=attrs.evolve(BASE.MODEL.backbone, depth=101))\n"
    )
    derived = specs.load(tmp_path / "derived.py")
    assert derived.backbone.depth == 101
    assert derived.head == specs.load(tmp_path / "base.py").head


def test_syntax_error_names_the_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text(
        "from fdet import specs\n"
        "MODEL = specs.RetinaNet(head=specs.RetinaHead(num_classes=2)\n"
        "X = 1\n"
    )
    with pytest.raises(SpecError) as info:
        specs.load(tmp_path / "broken.py")
    assert str(info.value).startswith("broken.py:2: syntax error: '(' was never closed")
    assert isinstance(info.value.__cause__, SyntaxError)


def test_misspelled_keyword_names_the_file_line_and_suggestion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo.py").write_text(
        "from fdet import specs\n"
        "MODEL = specs.RetinaNet(\n"
        "    head=specs.RetinaHead(num_clases=2),\n"
        ")\n"
    )
    with pytest.raises(SpecError) as info:
        specs.load(tmp_path / "typo.py")
    assert str(info.value) == (
        "typo.py:3: unknown keyword 'num_clases' for RetinaHead; did you mean 'num_classes'? "
        "allowed keywords: num_classes, num_convs, channels, prior_prob, norm"
    )
    # a derived file: the error is where the typo is, in the base
    (tmp_path / "derived.py").write_text(
        "from pathlib import Path\nfrom fdet.specs import load_module\n"
        "BASE = load_module(Path(__file__).with_name('typo.py'))\nMODEL = BASE.MODEL\n"
    )
    with pytest.raises(SpecError, match=r"^typo\.py:3: unknown keyword 'num_clases'"):
        specs.load(tmp_path / "derived.py")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("MODEL = specs.RetinaHead()", "bad.py:2: RetinaHead needs 'num_classes'"),
        ("MODEL = specs.RetinaHead(num_classes=0)", "bad.py:2: num_classes: must be > 0, got 0"),
        ("MODEL = specs.RetinaHead(num_classes=n)", "bad.py:2: NameError: name 'n' is not defined"),
        ("import attrs\nMODEL = attrs.evolve(specs.FPN(), chanels=8)", "bad.py:3: unknown keyword"),
        (
            "from fdet.specs import load_module\nBASE = load_module('gone.py')",
            "bad.py:3: spec file not found: ",
        ),
    ],
)
def test_errors_in_a_spec_file_name_the_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.py").write_text(f"from fdet import specs\n{body}\n")
    with pytest.raises(SpecError) as info:
        specs.load("bad.py")
    assert str(info.value).startswith(message)
