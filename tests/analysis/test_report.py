"""``fdet analyze`` and :func:`fdet.analysis.report.write_report` on tiny trained runs: the
files the page references exist, its numbers equal pycocotools' on the results written beside
it, it loads in a headless browser, and the command works end to end."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fdet import specs
from fdet.analysis.errors import ERROR_NAMES, ERROR_TYPES, error_breakdown
from fdet.analysis.metrics import TABLE_COLUMNS, category_names, per_class_table
from fdet.analysis.report import write_report
from fdet.cli import main
from fdet.train.engine import make_datasets
from tests.inference.conftest import RETINANET_DETECTS, MakeTinyRun

CHROMIUM = Path("/usr/bin/chromium")
FDET = Path(sys.executable).parent / "fdet"


class _Page(HTMLParser):
    """The image sources, link targets, the cells of each table by id, and the stat cells."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.stats: dict[str, tuple[str, str]] = {}
        self.body: dict[str, str] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._stat: tuple[str, str] | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.sources.append(a["src"])
        elif tag == "a" and not a.get("href", "#").startswith("#"):
            self.links.append(a["href"])
        elif tag == "body":
            self.body = a
        elif tag == "table" and "id" in a:
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td",) and self._table is not None:
            self._cell = []
            if a.get("id", "").startswith("stat-"):
                self._stat = (a["id"][5:], a["data-value"])

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            text = "".join(self._cell).strip()
            self.tables[self._table][-1].append(text)
            if self._stat is not None:
                self.stats[self._stat[0]] = (self._stat[1], text)
            self._cell, self._stat = None, None
        elif tag == "table":
            self._table = None


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def detecting_run(make_tiny_run: MakeTinyRun) -> Path:
    return make_tiny_run("retinanet_r18_fpn.py", RETINANET_DETECTS)


@pytest.fixture(scope="module")
def report(detecting_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report([detecting_run], tmp_path_factory.mktemp("report") / "out")


@pytest.fixture(scope="module")
def val_annotations(detecting_run: Path) -> Path:
    exp = specs.load(detecting_run / "spec.json", specs.Experiment)
    return Path(make_datasets(exp, with_train=False).val.annotation_file)


def _pycocotools_stats(annotations: Path, results: Path) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        dt = gt.loadRes(str(results))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def test_every_referenced_file_exists(report: Path) -> None:
    page = _parse(report.read_text())
    assert len(page.sources) >= 10  # PR, confusion, errors, galleries, data, curves, ...
    for ref in page.sources + page.links:
        assert not Path(ref).is_absolute() and "://" not in ref, ref
        assert (report.parent / ref).is_file(), f"{ref} is referenced but missing"
    for name in ("metrics.json", "results.json", "confusion_matrix.csv", "figures/pr.png"):
        assert name in page.sources + page.links


def test_stats_equal_metrics_json_and_pycocotools(report: Path, val_annotations: Path) -> None:
    out = report.parent
    results = json.loads((out / "results.json").read_text())
    assert results, "the tiny run under RETINANET_DETECTS should detect something"
    metrics = json.loads((out / "metrics.json").read_text())["bbox"]
    reference = _pycocotools_stats(val_annotations, out / "results.json")
    page = _parse(report.read_text())
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    names += ["AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert set(page.stats) == set(names)
    for name, ref in zip(names, reference):
        value, text = page.stats[name]
        assert float(value) == pytest.approx(metrics[name], abs=1e-9)
        assert metrics[name] == pytest.approx(ref, abs=1e-6), name
        assert text == ("n/a" if ref < 0 else f"{ref:.3f}"), name
    assert reference[1] > 0  # AP50: some detection is right, so the check compares numbers


def test_per_class_rows_equal_per_class_table(report: Path, val_annotations: Path) -> None:
    rows = per_class_table(val_annotations, report.parent / "results.json")
    table = _parse(report.read_text()).tables["per-class-table"]
    assert table[0] == []  # the header row holds th cells only
    shown = table[1:]
    assert len(shown) == len(rows) > 0
    for cells, row in zip(shown, rows):
        for cell, column in zip(cells, TABLE_COLUMNS, strict=True):
            value = row[column]
            if isinstance(value, float):
                assert cell == ("n/a" if value < 0 or np.isnan(value) else f"{value:.3f}")
            else:
                assert cell == str(value), column


def test_error_tables_equal_error_breakdown(report: Path, val_annotations: Path) -> None:
    breakdown = error_breakdown(val_annotations, report.parent / "results.json")
    tables = _parse(report.read_text()).tables
    overall = {row[0]: int(row[1]) for row in tables["errors-table"][1:] if row[1]}
    assert overall == {ERROR_NAMES[k]: n for k, n in breakdown.counts.items()}
    assert sum(overall.values()) > 0
    per_class = tables["errors-per-class"][1:]
    assert len(per_class) == len(category_names(val_annotations))
    for row in per_class:
        counts = [int(cell.split()[0]) for cell in row[1:]]
        assert counts == [breakdown.per_class_counts[k][row[0]] for k in ERROR_TYPES], row[0]


def test_other_data_and_max_images(
    detecting_run: Path, val_annotations: Path, tmp_path: Path
) -> None:
    exp = specs.load(detecting_run / "spec.json", specs.Experiment)
    images_dir = make_datasets(exp, with_train=False).val.images_dir
    index = write_report(
        [detecting_run], tmp_path / "out", data=(images_dir, val_annotations), max_images=2
    )
    out = index.parent
    first_two = [im["id"] for im in json.loads(val_annotations.read_text())["images"][:2]]
    assert [im["id"] for im in json.loads((out / "annotations.json").read_text())["images"]] == (
        first_two
    )
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(first_two)
    metrics = json.loads((out / "metrics.json").read_text())["bbox"]
    assert metrics["num_images"] == 2
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools on the full file, 2 images
        gt = COCO(str(val_annotations))
        ev = COCOeval(gt, gt.loadRes(str(out / "results.json")), "bbox")
        ev.params.imgIds = first_two
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert metrics["AP"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert _parse(index.read_text()).stats["AP50"][1] == f"{ev.stats[1]:.3f}"


def _dump_dom(index: Path) -> str:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: the report is not checked in a browser")
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            index.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_loads_in_chromium(report: Path) -> None:
    page = _parse(_dump_dom(report))
    assert page.body.get("data-images-ok") == "true"
    metrics = json.loads((report.parent / "metrics.json").read_text())["bbox"]
    assert page.stats["AP"][1] == f"{metrics['AP']:.3f}"


def test_a_missing_image_is_marked_in_chromium(report: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(report.parent, copy)
    (copy / "figures" / "pr.png").unlink()
    dom = _dump_dom(copy / "index.html")
    assert _parse(dom).body.get("data-images-ok") == "false"
    assert "image failed to load: figures/pr.png" in dom
    assert dom.count('class="broken"') == 1


def test_cli_end_to_end_with_two_runs(detecting_run: Path, tiny_run: Path, tmp_path: Path) -> None:
    if not FDET.is_file():
        pytest.skip(f"no installed fdet command at {FDET}")
    out = tmp_path / "analysis"
    done = subprocess.run(
        [str(FDET), "analyze", str(detecting_run), str(tiny_run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out / 'index.html'}" in done.stderr
    text = (out / "index.html").read_text()
    assert f"runs overlaid: {detecting_run.name}, {tiny_run.name}" in text
    assert (out / "figures" / "curves" / "losses.png").is_file()
    page = _parse(text)
    metrics = json.loads((out / "metrics.json").read_text())["bbox"]
    assert page.stats["AP"][1] == f"{metrics['AP']:.3f}"


@pytest.mark.parametrize("kind", ["missing", "not a checkpoint"])
def test_bad_run_is_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "nothing"
    if kind == "not a checkpoint":
        run = tmp_path / "notes.pt"
        run.write_text("not a checkpoint")
    assert main(["analyze", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fdet analyze: error: ") and str(run) in err
