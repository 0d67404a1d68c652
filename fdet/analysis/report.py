"""A static HTML report of a trained run: ``OUT/index.html`` and the files it shows.

:func:`write_report` runs the first run's model over its validation set (or another COCO data
set), writes the COCO results and metrics beside the page, and fills the page from the
functions of :mod:`fdet.analysis`: COCO stats and a per-class table, PR curves, a confusion
matrix, the error breakdown, the best and worst images, feature maps, data statistics and prior
coverage, model complexity and the training curves of every run given; for a model that
predicts masks, the same metrics and errors at mask IoU. Every path in the page is relative, so
the folder opens from disk wherever it is copied. The files written are listed in
``report_files.json``, which a rerun into the same folder removes first.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_NAME", "REPORT_NAME", "format_value", "write_report"]

REPORT_NAME = "index.html"
"""The report's page, in the output folder."""

MANIFEST_NAME = "report_files.json"
"""The list of the files the report wrote, in the output folder: what a rerun removes first."""

_GALLERY_COUNT = 6
_FEATURE_IMAGES = 2

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem;
       margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
img.broken { outline: 3px solid #c00; min-width: 4rem; min-height: 2rem; }
.broken-note { color: #c00; font-weight: bold; }
.note { color: #666; font-style: italic; }
.gallery { display: flex; flex-wrap: wrap; gap: .8rem; }
.gallery figure { margin: 0; max-width: 380px; }
.gallery figcaption { font-size: .85rem; }
pre { background: #f7f7f7; padding: .6rem; overflow-x: auto; font-size: .85rem; }
nav a { margin-right: .8rem; }
"""

# Marks an image that fails to load (a red outline and a note naming it) and, once every image
# has settled, sets ``document.body.dataset.imagesOk`` to "true" or "false".
_SCRIPT = """
(function () {
  function check() {
    var ok = true;
    Array.prototype.forEach.call(document.images, function (img) {
      if (img.complete && img.naturalWidth > 0) return;
      ok = false;
      img.classList.add("broken");
      var note = document.createElement("p");
      note.className = "broken-note";
      note.textContent = "image failed to load: " + img.getAttribute("src");
      img.parentNode.insertBefore(note, img.nextSibling);
    });
    document.body.dataset.imagesOk = ok ? "true" : "false";
  }
  if (document.readyState === "complete") check();
  else window.addEventListener("load", check);
})();
"""


def format_value(value: float | None) -> str:
    """How the report prints a metric: three decimals; ``n/a`` for COCO's ``-1`` (no ground
    truth in range), NaN or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0:
        return "n/a"
    return f"{value:.3f}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


class _Page:
    """The HTML being built: sections in order, image paths made relative to the output."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.sections: list[tuple[str, str, list[str]]] = []

    def section(self, key: str, title: str) -> list[str]:
        parts: list[str] = []
        self.sections.append((key, title, parts))
        return parts

    def img(self, path: Path, alt: str) -> str:
        rel = Path(os.path.relpath(Path(path).resolve(), self.out.resolve())).as_posix()
        return f'<img src="{_e(rel)}" alt="{_e(alt)}" loading="eager">'

    def link(self, path: Path, text: str) -> str:
        rel = Path(os.path.relpath(Path(path).resolve(), self.out.resolve())).as_posix()
        return f'<a href="{_e(rel)}">{_e(text)}</a>'

    def render(self, title: str, intro: str) -> str:
        nav = " ".join(f'<a href="#{key}">{_e(t)}</a>' for key, t, _ in self.sections)
        body = "\n".join(
            f'<section id="{key}">\n<h2>{_e(t)}</h2>\n' + "\n".join(parts) + "\n</section>"
            for key, t, parts in self.sections
        )
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{_e(title)}</h1>\n{intro}\n<nav>{nav}</nav>\n{body}\n"
            f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
        )


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, table_id: str | None = None
) -> str:
    """A table of already formatted cells (escaped here)."""
    ident = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_value(value)
    return str(value)


def _signed(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.3f}"


def _stats_table(stats: Sequence[float], table_id: str, cell_prefix: str) -> str:
    """The 12 COCO stats in one row; each cell keeps the exact value in ``data-value``."""
    from fdet.eval.coco import STAT_NAMES

    header = "".join(f"<th>{_e(n)}</th>" for n in STAT_NAMES)
    cells = "".join(
        f'<td id="{_e(cell_prefix)}{n}" data-value="{v!r}">{_e(format_value(v))}</td>'
        for n, v in zip(STAT_NAMES, stats)
    )
    return (
        f'<table id="{_e(table_id)}"><thead><tr>{header}</tr></thead>'
        f"<tbody><tr>{cells}</tr></tbody></table>"
    )


def _error_tables(
    page: _Page, breakdown: Any, class_names: dict[int, str], png: Path, id_prefix: str
) -> list[str]:
    """The error breakdown's chart, its overall table and its per-class table (ids
    ``{id_prefix}errors-table`` and ``{id_prefix}errors-per-class``)."""
    from fdet.analysis import errors

    parts = [page.img(errors.plot_error_breakdown(breakdown, png), f"{id_prefix}errors")]
    kinds = list(errors.ERROR_TYPES)
    parts.append(
        _table(
            ["error", "count", "ΔAP50 if fixed", "ΔAP if fixed"],
            (
                [
                    errors.ERROR_NAMES.get(k, k),
                    str(breakdown.counts.get(k, "")),
                    _signed(breakdown.delta_ap50.get(k)),
                    _signed(breakdown.delta_ap.get(k)),
                ]
                for k in [*kinds, "all"]
            ),
            table_id=f"{id_prefix}errors-table",
        )
    )
    parts.append(
        _note(
            f"base AP50 {format_value(breakdown.ap50)}, AP {format_value(breakdown.ap)}; "
            f"{breakdown.num_detections} detections, {breakdown.num_true_positives} true "
            f"positives, {breakdown.num_gt} ground-truth objects"
        )
    )
    per_class_delta = breakdown.per_class_delta_ap50
    classes = list(class_names.values())
    if classes:
        parts.append("<h3>Per class: count (ΔAP50 if fixed)</h3>")
        parts.append(
            _note("a detection counts for its predicted class, a missed object for its own")
        )
        parts.append(
            _table(
                ["class", *(errors.ERROR_NAMES.get(k, k) for k in kinds)],
                (
                    [
                        c,
                        *(
                            f"{breakdown.per_class_counts.get(k, {}).get(c, 0)} "
                            f"({_signed(per_class_delta.get(k, {}).get(c, math.nan))})"
                            for k in kinds
                        ),
                    ]
                    for c in classes
                ),
                table_id=f"{id_prefix}errors-per-class",
            )
        )
    return parts


def _subset_ground_truth(annotation_file: Path, image_ids: Sequence[int]) -> dict[str, Any]:
    """The annotation file cut to ``image_ids`` (the images evaluated), categories kept."""
    with open(annotation_file, encoding="utf-8") as f:
        dataset = json.load(f)
    keep = set(image_ids)
    out = {k: v for k, v in dataset.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in dataset.get("images", []) if im["id"] in keep]
    out["annotations"] = [a for a in dataset.get("annotations", []) if a["image_id"] in keep]
    out.setdefault("categories", [])
    return out


def write_report(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    data: tuple[str | Path, str | Path] | None = None,
    max_images: int | None = None,
    device: str = "cpu",
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
) -> Path:
    """Analyze the first of ``runs`` (a run folder or checkpoint file) and write the report to
    ``out_dir``; returns the path of ``out_dir/index.html``.

    The model (:func:`fdet.train.load_run`) runs over its validation set
    (:func:`fdet.train.engine.make_datasets`), or over ``data = (images_dir,
    annotation_file)`` through the run's validation transforms, the first ``max_images`` images
    if given. Beside the page: ``results.json`` (COCO results), ``annotations.json`` (the
    ground truth of the images evaluated, what every number is computed against),
    ``metrics.json`` (:func:`fdet.eval.coco.evaluate_coco`, keyed ``"bbox"`` as ``fdet eval
    --out`` writes it), ``confusion_matrix.csv`` and the figures under ``figures/``.
    ``score_threshold`` and ``iou_threshold`` are those of the confusion matrix and of the
    false positives and missed objects marked on the best and worst images. The training curves
    of every run are overlaid.

    When the model predicts masks (its results carry ``"segmentation"``) and every ground-truth
    annotation has one, a "Masks (segm)" section adds the COCO segm stats, the per-class segm
    table and the error breakdown at mask IoU, and ``metrics.json`` gets a ``"segm"`` entry;
    the box sections are the same either way.

    ``out_dir`` must be new, empty, or a previous report: the report lists the files it wrote
    in ``out_dir/report_files.json`` (:data:`MANIFEST_NAME`), and a rerun first removes those
    files (and the folders this empties), so no image of the last run stays behind; other files
    are left alone. A folder with other content and no such list raises ``FileExistsError``.
    """
    import torch

    from fdet.analysis import complexity, curves, data_stats, errors, metrics
    from fdet.data.loader import make_loader
    from fdet.eval.coco import evaluate_coco, has_segmentations
    from fdet.eval.evaluate import predict_coco
    from fdet.train import load_run
    from fdet.train.data import evaluation_set
    from fdet.train.run_dir import resolve_checkpoint

    if not runs:
        raise ValueError("write_report: no run given")
    if max_images is not None and max_images < 1:
        raise ValueError(f"write_report: max_images must be >= 1, got {max_images}")
    run_paths = [Path(r) for r in runs]
    for r in run_paths:
        if not r.exists():
            raise FileNotFoundError(f"no run folder or checkpoint file at {r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: is a file, not a folder")
    previous = _previous_report_files(out)
    figures = out / "figures"

    checkpoint = resolve_checkpoint(run_paths[0])
    exp, model = load_run(checkpoint, device=device)
    evaluation = evaluation_set(exp, checkpoint, data)
    dataset, label_to_category_id = evaluation.dataset, evaluation.label_to_category_id
    source = str(dataset.annotation_file)
    loader = make_loader(
        dataset,
        batch_size=exp.batch_size,
        shuffle=False,
        seed=exp.seed,
        num_workers=exp.num_workers,
        pad_divisor=exp.val_transforms.pad_divisor,
        drop_last=False,
    )
    predictions = predict_coco(
        model,
        loader,
        dataset,
        device=device,
        max_images=max_images,
        label_to_category_id=label_to_category_id,
    )
    _remove_files(out, previous)
    figures.mkdir(parents=True, exist_ok=True)
    kept = _files_under(out)  # not written by this report: never listed, never removed
    _write_manifest(out, [])
    try:
        results = predictions.results
        results_file = out / "results.json"
        results_file.write_text(json.dumps(results))
        gt_file = out / "annotations.json"
        gt_file.write_text(
            json.dumps(_subset_ground_truth(dataset.annotation_file, predictions.image_ids))
        )
        gt = metrics.load_ground_truth(gt_file)
        class_names = metrics.category_names(gt)

        page = _Page(out)

        # COCO stats ----------------------------------------------------------------------------
        coco = evaluate_coco(gt, results)
        by_type = {"bbox": coco.to_dict()}
        with_masks = any("segmentation" in r for r in results) and has_segmentations(gt)
        if with_masks:
            segm = evaluate_coco(gt, results, iou_type="segm")
            by_type["segm"] = segm.to_dict()
        (out / "metrics.json").write_text(json.dumps(by_type, indent=2) + "\n")
        parts = page.section("coco", "COCO metrics (boxes)")
        parts.append(_stats_table(coco.stats, "coco-stats", "stat-"))
        parts.append(
            _note(
                f"{coco.num_images} images, {coco.num_detections} detections; "
                "n/a: no ground truth in that range. "
            )
            + f"<p>{page.link(out / 'metrics.json', 'metrics.json')} · "
            f"{page.link(results_file, 'results.json')} · "
            f"{page.link(gt_file, 'annotations.json')}</p>"
        )

        # per-class table -----------------------------------------------------------------------
        parts = page.section("per-class", "Per-class AP and AR")
        rows = metrics.per_class_table(gt, results)
        parts.append(
            _table(
                metrics.TABLE_COLUMNS,
                ([_cell(row[c]) for c in metrics.TABLE_COLUMNS] for row in rows),
                table_id="per-class-table",
            )
        )

        # PR curves -----------------------------------------------------------------------------
        parts = page.section("pr", "Precision–recall curves")
        pr = metrics.pr_curves(gt, results, iou_thresholds=(0.5, 0.75))
        if any((p > -1).any() for _, p in pr.values()):
            parts.append(
                page.img(metrics.plot_pr_curves(pr, class_names, figures / "pr.png"), "PR")
            )
        else:
            parts.append(_note("no category has ground truth among the images evaluated"))

        # confusion matrix ----------------------------------------------------------------------
        parts = page.section("confusion", "Confusion matrix")
        cm = metrics.confusion_matrix(
            gt, results, iou_threshold=iou_threshold, score_threshold=score_threshold
        )
        csv = cm.to_csv(out / "confusion_matrix.csv")
        png = metrics.plot_confusion_matrix(cm, None, figures / "confusion_matrix.png")
        parts.append(
            _note(
                f"detections with score ≥ {score_threshold} matched to ground truth at "
                f"IoU ≥ {iou_threshold}; rows: ground truth, columns: prediction"
            )
        )
        parts.append(page.img(png, "confusion matrix"))
        parts.append(f"<p>{page.link(csv, 'confusion_matrix.csv')}</p>")

        # error breakdown -----------------------------------------------------------------------
        parts = page.section("errors", "Error breakdown")
        breakdown = errors.error_breakdown(gt, results)
        parts.extend(_error_tables(page, breakdown, class_names, figures / "errors.png", ""))

        # masks ---------------------------------------------------------------------------------
        if with_masks:
            parts = page.section("masks", "Masks (segm)")
            parts.append(
                _note(
                    "the same detections evaluated by their masks: COCO segm stats, per-class AP "
                    "and AR, and the error breakdown at mask IoU"
                )
            )
            parts.append("<h3>COCO metrics (masks)</h3>")
            parts.append(_stats_table(segm.stats, "segm-stats", "segm-stat-"))
            parts.append("<h3>Per-class AP and AR (masks)</h3>")
            segm_rows = metrics.per_class_table(gt, results, iou_type="segm")
            parts.append(
                _table(
                    metrics.TABLE_COLUMNS,
                    ([_cell(row[c]) for c in metrics.TABLE_COLUMNS] for row in segm_rows),
                    table_id="segm-per-class-table",
                )
            )
            parts.append("<h3>Error breakdown (masks)</h3>")
            segm_breakdown = errors.error_breakdown(gt, results, iou_type="segm")
            parts.extend(
                _error_tables(
                    page, segm_breakdown, class_names, figures / "errors_segm.png", "segm-"
                )
            )

        # best and worst images -----------------------------------------------------------------
        parts = page.section("images", "Best and worst images")
        try:
            from fdet.analysis.images import best_worst_images
        except ImportError as e:
            parts.append(_note(f"not available in this installation ({e})"))
        else:
            galleries = best_worst_images(
                gt,
                results,
                dataset.images_dir,
                out / "images",
                count=_GALLERY_COUNT,
                iou_threshold=iou_threshold,
                score_threshold=score_threshold,
            )
            for key in ("best", "worst"):
                items = galleries.get(key, [])
                parts.append(f"<h3>{key.capitalize()} by per-image AP</h3>")
                if not items:
                    parts.append(_note("no images"))
                    continue
                figs = []
                for item in items:
                    caption = (
                        f"{item.file_name}: AP {format_value(item.ap)}, "
                        f"{item.false_positives} false positives, {item.missed} missed"
                    )
                    figs.append(
                        f"<figure>{page.img(Path(item.path), item.file_name)}"
                        f"<figcaption>{_e(caption)}</figcaption></figure>"
                    )
                parts.append('<div class="gallery">' + "\n".join(figs) + "</div>")

        # one pass over the data: gt boxes in network-input pixels, images for feature maps ----
        boxes: list[torch.Tensor] = []
        box_labels: list[torch.Tensor] = []
        input_size = (0, 0)
        samples: list[tuple[int, torch.Tensor]] = []
        seen = 0
        for batch in loader:
            if max_images is not None and seen >= max_images:
                break
            count = batch.images.shape[0]
            if max_images is not None:
                count = min(count, max_images - seen)
            seen += count
            h, w = batch.images.shape[-2:]
            input_size = (max(input_size[0], int(h)), max(input_size[1], int(w)))
            for b in range(count):
                boxes.append(batch.gt_boxes[b][batch.gt_valid[b]])
                box_labels.append(batch.gt_labels[b][batch.gt_valid[b]])
                if len(samples) < _FEATURE_IMAGES:
                    ih, iw = (int(v) for v in batch.image_sizes[b])
                    samples.append((int(batch.image_ids[b]), batch.images[b, :, :ih, :iw].clone()))

        # feature maps --------------------------------------------------------------------------
        parts = page.section("features", "Feature maps")
        try:
            from fdet.analysis.features import feature_maps
        except ImportError as e:
            parts.append(_note(f"not available in this installation ({e})"))
        else:
            parts.append(
                _note("FPN levels: channel mean and the most active channels, over the image")
            )
            figs = []
            for image_id, image in samples:
                name = gt.imgs[image_id].get("file_name", str(image_id))
                path = feature_maps(model, image, figures / f"features_{image_id}.png")
                figs.append(
                    f"<figure>{page.img(Path(path), f'features of {name}')}"
                    f"<figcaption>{_e(name)}</figcaption></figure>"
                )
            parts.append('<div class="gallery">' + "\n".join(figs) + "</div>")

        # data statistics and prior coverage ----------------------------------------------------
        parts = page.section("data", "Data statistics")
        stats = data_stats.data_statistics(gt)
        parts.append(
            _table(
                ["images", "annotations", "crowd", "degenerate", *stats.area_counts],
                [
                    [
                        str(stats.num_images),
                        str(stats.num_annotations),
                        str(stats.num_crowd),
                        str(stats.num_degenerate),
                        *(str(v) for v in stats.area_counts.values()),
                    ]
                ],
                table_id="data-stats",
            )
        )
        parts.append(
            _table(
                ["class", "instances", "images"],
                (
                    [stats.category_names.get(c, str(c)), str(n), str(stats.class_images.get(c, 0))]
                    for c, n in stats.class_counts.items()
                ),
                table_id="class-counts",
            )
        )
        figs = [
            page.img(p, p.stem) for p in data_stats.plot_data_statistics(stats, figures / "data")
        ]
        parts.append('<div class="gallery">' + "\n".join(figs) + "</div>")
        parts.append("<h3>Prior coverage</h3>")
        all_boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4)
        # each box with its class and image: boxes of one image compete for priors and cells
        image_index = torch.repeat_interleave(
            torch.arange(len(boxes)), torch.tensor([len(b) for b in boxes], dtype=torch.long)
        )
        all_labels = torch.cat(box_labels).long() if box_labels else torch.zeros(0).long()
        try:
            coverage = data_stats.prior_coverage(
                exp.model, all_boxes, input_size, labels=all_labels, image_index=image_index
            )
        except ValueError as e:
            parts.append(_note(str(e)))
        else:
            total = int(all_boxes.shape[0])
            missed = coverage.num_missed
            if isinstance(coverage, data_stats.PriorCoverage):
                how = (
                    f"no anchor reaches IoU {coverage.pos_iou} with them (the assigner's positive "
                    f"threshold); {int(coverage.low_quality_only.sum())} of these still get their "
                    "best anchor through low-quality matching"
                )
            elif isinstance(coverage, data_stats.AdaptiveCoverage):
                how = "the ATSS assigner gives them no positive anchor"
            elif isinstance(coverage, data_stats.CentreCoverage):
                how = (
                    "they lose their centre cell to another object's targets, or are no "
                    "object on the output map"
                )
            else:
                how = "no point is made positive for them by the assigner"
            parts.append(
                f'<p id="prior-coverage">{_e(missed)} of {_e(total)} ground-truth boxes '
                f"({_e(format_value(missed / total if total else float('nan')))}): {_e(how)}; "
                f"network input {input_size[0]}×{input_size[1]} px.</p>"
            )

        # complexity ----------------------------------------------------------------------------
        parts = page.section("complexity", "Model complexity")
        size = input_size if input_size[0] > 0 else (exp.val_transforms.max_size,) * 2
        comp = complexity.model_complexity(model, size, device=device)
        parts.append(f"<pre>{_e(comp.to_table())}</pre>")

        # training curves -----------------------------------------------------------------------
        parts = page.section("curves", "Training curves")
        labels = _run_labels(run_paths)
        try:
            paths = curves.plot_training_curves(
                [_run_folder(r) for r in run_paths], figures / "curves", labels
            )
        except (curves.LogError, OSError) as e:
            parts.append(_note(f"no training curves: {' '.join(str(e).split())}"))
        else:
            if len(run_paths) > 1:
                parts.append(_note("runs overlaid: " + ", ".join(labels)))
            parts.append("\n".join(page.img(p, p.stem) for p in paths))

        intro = (
            f"<p>Run <code>{_e(run_paths[0])}</code> (checkpoint <code>{_e(checkpoint)}</code>) "
            f"on <code>{_e(source)}</code>, {len(predictions.image_ids)} images.</p>"
        )
        index = out / REPORT_NAME
        index.write_text(
            page.render(f"fdet analysis: {run_paths[0].name}", intro), encoding="utf-8"
        )
    finally:  # also after a failure, so that a rerun removes what was written
        _write_manifest(out, sorted(_files_under(out) - kept))
    return index


def _files_under(out: Path) -> set[str]:
    """The files under ``out`` (relative, ``/``-separated), the manifest left out."""
    if not out.is_dir():
        return set()
    found = {
        Path(os.path.relpath(Path(root) / name, out)).as_posix()
        for root, _, names in os.walk(out)
        for name in names
    }
    found.discard(MANIFEST_NAME)
    return found


def _previous_report_files(out: Path) -> list[str]:
    """The files a previous report wrote to ``out`` (from its manifest); ``[]`` for a missing
    or empty folder. A folder with other content and no manifest is refused."""
    if not out.is_dir():
        return []
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        entries = sorted(p.name for p in out.iterdir())
        if not entries:
            return []
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"{out}: holds files that are not from an fdet report ({shown}; no "
            f"{MANIFEST_NAME}); give an empty or new folder, or a previous report's"
        )
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
            raise TypeError("not a list of paths")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest}: not a report's list of files ({e})") from None
    return listed


def _remove_files(out: Path, listed: Sequence[str]) -> None:
    """Remove the files of ``listed`` (relative paths inside ``out``) that exist, then the
    folders this leaves empty; a path leaving ``out`` is skipped."""
    root = out.resolve()
    folders: set[Path] = set()
    for rel in listed:
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST_NAME:
            continue
        path = out / rel
        if not path.parent.resolve().is_relative_to(root):  # through a linked folder
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
            folders.update(p for p in (out / rel).parents if p.resolve() != root)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _write_manifest(out: Path, files: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"written_by": "fdet analyze", "files": list(files)}, indent=1) + "\n"
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)


def _run_folder(run: Path) -> Path:
    """The run folder of a run folder or of a checkpoint file (``RUN/checkpoints/X.pt``)."""
    if run.is_file():
        return run.parent.parent if run.parent.name == "checkpoints" else run.parent
    return run


def _run_labels(runs: Sequence[Path]) -> list[str]:
    """Each run's folder name, numbered where two are the same."""
    base = [_run_folder(r).resolve().name for r in runs]
    seen: dict[str, int] = {}
    out = []
    for name in base:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out
