"""``fdet analyze`` and :func:`fdet.analysis.report.write_report` on tiny trained runs: the
files the page references exist, its numbers equal pycocotools' on the results written beside
it, it loads in a headless browser, and the command works end to end."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fdet import specs
from fdet.analysis.errors import ERROR_NAMES, ERROR_TYPES, error_breakdown
from fdet.analysis.metrics import TABLE_COLUMNS, category_names, per_class_table
from fdet.analysis.report import MANIFEST_NAME, write_report
from fdet.cli import main
from fdet.train.engine import make_datasets
from tests.inference.conftest import MASK_RCNN_DETECTS, RETINANET_DETECTS, MakeTinyRun

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
        self.values: dict[str, tuple[str, str]] = {}
        self.nav: list[str] = []
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
        elif tag == "a":
            self.nav.append(a["href"][1:])
        elif tag == "body":
            self.body = a
        elif tag == "table" and "id" in a:
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td",) and self._table is not None:
            self._cell = []
            if "data-value" in a:
                self._stat = (a["id"], a["data-value"])

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            text = "".join(self._cell).strip()
            self.tables[self._table][-1].append(text)
            if self._stat is not None:
                self.values[self._stat[0]] = (self._stat[1], text)
                if self._stat[0].startswith("stat-"):
                    self.stats[self._stat[0][5:]] = (self._stat[1], text)
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


def _pycocotools_stats(
    annotations: Path, results: Path, iou_type: str = "bbox", image_ids: list[int] | None = None
) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        dt = gt.loadRes(str(results))
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = image_ids
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


# masks -------------------------------------------------------------------------------------

_MASK_IMAGES = 4
_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
_STAT_NAMES += ["AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@pytest.fixture(scope="module")
def mask_run(make_tiny_run: MakeTinyRun) -> Path:
    return make_tiny_run("mask_rcnn_r18_fpn.py", MASK_RCNN_DETECTS)


@pytest.fixture(scope="module")
def mask_report(mask_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mask-report") / "out"
    return write_report([mask_run], out, max_images=_MASK_IMAGES)


def _known_mask_results(annotations: Path, image_ids: list[int]) -> list[dict]:
    """Results made from the ground truth, so that box and mask APs are above 0 and differ:
    of every three objects one found exactly, one with its mask shifted 3 px (its box exact),
    one missed; plus each exact one again under the next class, at a lower score."""
    from pycocotools import mask as mask_utils

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
    cat_ids = sorted(gt.getCatIds())
    results = []
    anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids)) if not a.get("iscrowd")]
    for i, ann in enumerate(anns):
        mask = gt.annToMask(ann)
        if i % 3 == 2:
            continue
        if i % 3 == 1:
            mask = np.roll(mask, 3, axis=1)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        record = {"image_id": ann["image_id"], "bbox": ann["bbox"], "segmentation": rle}
        results.append({**record, "category_id": ann["category_id"], "score": 0.9 - 0.001 * i})
        if i % 3 == 0:
            other = cat_ids[(cat_ids.index(ann["category_id"]) + 1) % len(cat_ids)]
            results.append({**record, "category_id": other, "score": 0.5})
    return results


@pytest.fixture(scope="module")
def known_mask_report(
    mask_run: Path, mask_val_annotations: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The report of the Mask R-CNN run with its results replaced by known ones."""
    import fdet.eval.evaluate as evaluate

    real = evaluate.predict_coco

    def predict(*args: object, **kwargs: object) -> evaluate.Predictions:
        seen = real(*args, **kwargs)  # type: ignore[arg-type]
        known = _known_mask_results(mask_val_annotations, seen.image_ids)
        return seen._replace(results=known)

    out = tmp_path_factory.mktemp("known-mask-report") / "out"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(evaluate, "predict_coco", predict)
        return write_report([mask_run], out, max_images=_MASK_IMAGES)


@pytest.fixture(scope="module")
def mask_val_annotations(mask_run: Path) -> Path:
    exp = specs.load(mask_run / "spec.json", specs.Experiment)
    return Path(make_datasets(exp, with_train=False).val.annotation_file)


def _evaluated_ids(out: Path) -> list[int]:
    return [im["id"] for im in json.loads((out / "annotations.json").read_text())["images"]]


@pytest.mark.parametrize("which", ["mask_report", "known_mask_report"])
def test_mask_stats_equal_metrics_json_and_pycocotools(
    which: str, mask_val_annotations: Path, request: pytest.FixtureRequest
) -> None:
    mask_report = request.getfixturevalue(which)
    out = mask_report.parent
    results = json.loads((out / "results.json").read_text())
    assert results and all("segmentation" in r for r in results)
    ids = _evaluated_ids(out)
    assert len(ids) == _MASK_IMAGES
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}
    assert metrics["segm"]["num_images"] == _MASK_IMAGES
    # against the full annotation file, restricted to the images evaluated
    reference = _pycocotools_stats(mask_val_annotations, out / "results.json", "segm", ids)
    box_reference = _pycocotools_stats(mask_val_annotations, out / "results.json", "bbox", ids)
    page = _parse(mask_report.read_text())
    for name, ref, box in zip(_STAT_NAMES, reference, box_reference):
        value, text = page.values[f"segm-stat-{name}"]
        assert float(value) == pytest.approx(metrics["segm"][name], abs=1e-9), name
        assert metrics["segm"][name] == pytest.approx(ref, abs=1e-6), name
        assert text == ("n/a" if ref < 0 else f"{ref:.3f}"), name
        assert page.stats[name][1] == ("n/a" if box < 0 else f"{box:.3f}"), name  # boxes kept
    if which == "known_mask_report":  # the tiny model's masks may all be wrong
        assert 0 < reference[0] < box_reference[0] < 1  # so the check compares numbers
    assert "masks" in page.nav and "coco" in page.nav


def test_mask_per_class_and_error_tables(known_mask_report: Path) -> None:
    out = known_mask_report.parent
    tables = _parse(known_mask_report.read_text()).tables
    rows = per_class_table(out / "annotations.json", out / "results.json", iou_type="segm")
    box_rows = per_class_table(out / "annotations.json", out / "results.json")
    shown = tables["segm-per-class-table"][1:]
    assert len(shown) == len(rows) > 0
    for cells, row in zip(shown, rows):
        for cell, column in zip(cells, TABLE_COLUMNS, strict=True):
            value = row[column]
            if isinstance(value, float):
                assert cell == ("n/a" if value < 0 or np.isnan(value) else f"{value:.3f}")
            else:
                assert cell == str(value), column
    assert shown != tables["per-class-table"][1:] and rows != box_rows
    breakdown = error_breakdown(out / "annotations.json", out / "results.json", iou_type="segm")
    overall = {row[0]: int(row[1]) for row in tables["segm-errors-table"][1:] if row[1]}
    assert overall == {ERROR_NAMES[k]: n for k, n in breakdown.counts.items()}
    assert sum(overall.values()) > 0
    for row in tables["segm-errors-per-class"][1:]:
        counts = [int(cell.split()[0]) for cell in row[1:]]
        assert counts == [breakdown.per_class_counts[k][row[0]] for k in ERROR_TYPES], row[0]
    box = error_breakdown(out / "annotations.json", out / "results.json")
    assert breakdown.counts != box.counts  # shifted masks are localization errors, boxes not
    assert (out / "figures" / "errors_segm.png").is_file()


def test_mask_report_loads_in_chromium(mask_report: Path) -> None:
    page = _parse(_dump_dom(mask_report))
    assert page.body.get("data-images-ok") == "true"
    metrics = json.loads((mask_report.parent / "metrics.json").read_text())["segm"]
    assert page.values["segm-stat-AP"][1] == f"{metrics['AP']:.3f}"


def test_box_model_has_no_mask_section(report: Path) -> None:
    page = _parse(report.read_text())
    assert "masks" not in page.nav and not any(k.startswith("segm") for k in page.tables)
    assert set(json.loads((report.parent / "metrics.json").read_text())) == {"bbox"}


# reruns ------------------------------------------------------------------------------------


def _pngs(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png")}


def test_rerun_leaves_no_stale_file(detecting_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = write_report([detecting_run], out)
    assert _pngs(out) == set(_parse(first.read_text()).sources)
    galleries = {p for p in _pngs(out) if p.startswith("images/")}
    manifest = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert set(manifest) >= _pngs(out) | {"index.html", "metrics.json", "results.json"}
    # files the report did not write: one of the user's, one outside named by a bad list
    (out / "notes.txt").write_text("mine")
    (tmp_path / "outside.txt").write_text("not the report's")
    listed = json.loads((out / MANIFEST_NAME).read_text())
    listed["files"] += ["../outside.txt", str((tmp_path / "outside.txt").resolve())]
    (out / MANIFEST_NAME).write_text(json.dumps(listed))

    second = write_report([detecting_run], out, max_images=1)
    fewer = {p for p in _pngs(out) if p.startswith("images/")}
    assert len(fewer) < len(galleries)  # stale ones would remain if nothing were removed
    assert _pngs(out) == set(_parse(second.read_text()).sources)
    assert (out / "notes.txt").read_text() == "mine"
    assert (tmp_path / "outside.txt").read_text() == "not the report's"
    assert "notes.txt" not in json.loads((out / MANIFEST_NAME).read_text())["files"]


def test_folder_with_other_files_is_refused_untouched(
    detecting_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "photos"
    (out / "figures").mkdir(parents=True)
    (out / "index.html").write_text("<p>my page</p>")
    (out / "figures" / "pr.png").write_bytes(b"mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="not from an fdet report"):
        write_report([detecting_run], out)
    assert main(["analyze", str(detecting_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fdet analyze: error: ") and str(out) in err and "index.html" in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and set(out.rglob("*")) == {*before, out / "figures"}


def test_prior_coverage_of_an_atss_run_counts_the_assigners_misses(
    make_tiny_run: MakeTinyRun, tmp_path: Path
) -> None:
    """The report's prior coverage of an ATSS run is the ATSS assigner's: the boxes of each image
    assigned together, the missed count equal to ``prior_coverage`` on the same boxes."""
    from fdet.analysis import data_stats
    from fdet.train import load_run
    from fdet.train.engine import make_datasets

    run = make_tiny_run("atss_r18_fpn.py")
    index = write_report([run], tmp_path / "out", max_images=4)
    text = index.read_text()
    found = re.search(r'<p id="prior-coverage">(\d+) of (\d+) ground-truth boxes', text)
    assert found is not None and "ATSS assigner" in text
    exp, _ = load_run(run)
    val = make_datasets(exp, with_train=False).val
    samples = [val[i] for i in range(min(4, len(val)))]
    boxes = [s.boxes for s in samples]
    size = max(s.image.shape[-2] for s in samples), max(s.image.shape[-1] for s in samples)
    pad = exp.val_transforms.pad_divisor
    size = (-(-size[0] // pad) * pad, -(-size[1] // pad) * pad)
    coverage = data_stats.prior_coverage(
        exp.model,
        torch.cat(boxes),
        size,
        labels=torch.cat([s.labels for s in samples]),
        image_index=torch.repeat_interleave(
            torch.arange(len(boxes)), torch.tensor([len(b) for b in boxes])
        ),
    )
    assert isinstance(coverage, data_stats.AdaptiveCoverage)
    assert int(found.group(2)) > 0
    assert (int(found.group(1)), int(found.group(2))) == (
        coverage.num_missed,
        int(torch.cat(boxes).shape[0]),
    )
