"""The evaluation report: ``report/index.html`` next to metrics.json, one page that opens offline
(inline SVG charts, PNGs written beside it, a little inline JavaScript for sorting and filtering),
and the page comparing two evaluations (``segkit-report``).

The pictures are drawn by :mod:`segkit.inference.masks` (one palette, one overlay, the export's
image | prediction | truth panels); the numbers come from metrics.json's record and the per-image
rows the evaluation loop counted (:func:`segkit.evaluation.metrics.image_stats`).
"""
from __future__ import annotations

import heapq
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segkit import distributed
from segkit.errors import ConfigError
from segkit.files import write_text_atomic
from segkit.inference.masks import comparison, overlay, write_png

REPORT_DIR = "report"
#: The long side of the worst images' pictures: the candidates are kept at this size, so the memory
#: they take stays bounded whatever the images' size.
THUMB_SIDE = 320
HEATMAP_CLASSES = 40
TOP_CONFUSIONS = 20
CHANGED_IMAGES = 24
#: The errors panel: correct pixels dimmed, wrong ones red, ignored ones grey.
ERROR_PALETTE = np.array([[0, 0, 0], [255, 0, 0], [160, 160, 160]], np.uint8)
ERROR_ALPHA = 0.7


# -- the worst images, kept during the evaluation -----------------------------------------------
class WorstImages:
    """Row callback of :func:`segkit.evaluation.loop.evaluate` keeping the ``k`` images of lowest
    per-image mIoU seen so far (ties: the lower index) with their pixels at thumbnail size; the
    others' pixels are dropped at once."""

    def __init__(self, k: int, ignore_index: int = 255, max_side: int = THUMB_SIDE) -> None:
        self.k = k
        self.ignore_index = ignore_index
        self.max_side = max_side
        # A max-heap by (mIoU, index) through negated keys: its top is the best image kept.
        self._heap: list[tuple[float, int, dict[str, Any], np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, row: dict[str, Any], image: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> None:
        if self.k == 0 or row["mIoU"] is None:
            return
        key = (-row["mIoU"], -row["index"])
        if len(self._heap) == self.k and key <= self._heap[0][:2]:
            return
        item = (*key, row, *self._thumbnails(image, mask, pred))
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        else:
            heapq.heapreplace(self._heap, item)

    def _thumbnails(self, image: np.ndarray, mask: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
        pred = pred.astype(np.uint8)  # class ids < 256 (settings: num_classes <= 255)
        h, w = mask.shape
        scale = self.max_side / max(h, w)
        if scale >= 1:
            return image.copy(), mask.copy(), pred
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return (np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)),
                np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)),
                np.asarray(Image.fromarray(pred).resize(size, Image.NEAREST)))

    def gathered(self) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]]:
        """The ``k`` worst over all ranks, worst first, on rank 0 (collective: every rank calls it;
        the other ranks get an empty list)."""
        items = [item[2:] for item in self._heap]
        every = distributed.gather_to_main(items)
        return sorted(every, key=lambda item: (item[0]["mIoU"], item[0]["index"]))[: self.k]


def errors_panel(image: np.ndarray, pred: np.ndarray, mask: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """``image`` with its wrongly predicted pixels red and its ignored pixels grey."""
    kinds = np.where(mask == ignore_index, 2, (pred != mask).astype(np.uint8)).astype(np.uint8)
    return overlay(image, kinds, ERROR_PALETTE, ERROR_ALPHA)


def worst_picture(image: np.ndarray, pred: np.ndarray, mask: np.ndarray, palette: np.ndarray,
                  ignore_index: int = 255) -> np.ndarray:
    """image | prediction | truth (the export's comparison) | errors, H x 4W x 3 uint8."""
    return np.concatenate([comparison(image, pred, mask, palette),
                           errors_panel(image, pred, mask, ignore_index)], axis=1)


# -- numbers -----------------------------------------------------------------------------------
def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def top_confusions(confusion: np.ndarray, classes: Sequence[str], n: int = TOP_CONFUSIONS) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal counts (most pixels first) with the share of the truth class's
    pixels they take."""
    mat = np.asarray(confusion, np.int64)
    off = mat.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    rows = mat.sum(1)
    found = []
    for flat in order:
        t, p = divmod(int(flat), mat.shape[1])
        if off[t, p] == 0:
            break
        found.append({"truth": classes[t], "pred": classes[p], "pixels": int(off[t, p]),
                      "share": float(off[t, p] / rows[t])})
    return found


def heatmap_classes(confusion: np.ndarray, limit: int = HEATMAP_CLASSES) -> list[int]:
    """All class ids when there are at most ``limit``; otherwise the ``limit`` with the most wrongly
    labelled pixels (missed as truth plus wrongly predicted), in id order."""
    mat = np.asarray(confusion, np.int64)
    if len(mat) <= limit:
        return list(range(len(mat)))
    wrong = mat.sum(0) + mat.sum(1) - 2 * np.diag(mat)
    return sorted(np.argsort(-wrong, kind="stable")[:limit].tolist())


# -- SVG charts --------------------------------------------------------------------------------
def _hex(color: Sequence[int]) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in color)


def bar_chart(classes: Sequence[str], iou: Sequence[float | None], palette: np.ndarray) -> str:
    """Horizontal bars of per-class IoU in the classes' colours, best first (no IoU: no bar)."""
    order = sorted(range(len(classes)), key=lambda i: (-(iou[i] if iou[i] is not None else -1), i))
    label_w, bar_w, row_h = 180, 420, 16
    height = row_h * len(classes) + 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 60}" height="{height}" '
             f'role="img" aria-label="IoU per class">']
    for x in (0, 0.25, 0.5, 0.75, 1.0):
        gx = label_w + x * bar_w
        parts.append(f'<line x1="{gx:.1f}" y1="0" x2="{gx:.1f}" y2="{height - 20}" stroke="#ddd"/>'
                     f'<text x="{gx:.1f}" y="{height - 6}" font-size="10" text-anchor="middle">{int(x * 100)}%</text>')
    for row, i in enumerate(order):
        y = row * row_h
        value = iou[i]
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" font-size="11" text-anchor="end">{_esc(classes[i])}</text>')
        if value is not None:
            parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{value * bar_w:.1f}" height="{row_h - 4}" '
                         f'fill="{_hex(palette[i])}" stroke="#555" stroke-width="0.5">'
                         f'<title>{_esc(classes[i])}: IoU {_pct(value)}%</title></rect>'
                         f'<text x="{label_w + value * bar_w + 4:.1f}" y="{y + 12}" font-size="10">{_pct(value)}</text>')
        else:
            parts.append(f'<text x="{label_w + 4}" y="{y + 12}" font-size="10" fill="#888">not present</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap(confusion: np.ndarray, classes: Sequence[str], ids: Sequence[int]) -> str:
    """The row-normalised confusion matrix of ``ids`` (rows truth, columns prediction) as an SVG
    heat map; a cell's tooltip gives its share and count."""
    mat = np.asarray(confusion, np.float64)
    rows = mat.sum(1)
    n = len(ids)
    cell, label_w = max(16, min(48, 640 // max(n, 1))), 150  # cells large enough for a number up to 13 classes
    size_w, size_h = label_w + n * cell + 10, label_w + n * cell + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size_w}" height="{size_h}" role="img" '
             f'aria-label="row-normalised confusion matrix">']
    for k, i in enumerate(ids):
        y = label_w + k * cell
        parts.append(f'<text x="{label_w - 4}" y="{y + cell / 2 + 4}" font-size="10" text-anchor="end">'
                     f'{_esc(classes[i])}</text>')
        x = label_w + k * cell
        parts.append(f'<text transform="translate({x + cell / 2 + 4},{label_w - 4}) rotate(-60)" font-size="10">'
                     f'{_esc(classes[i])}</text>')
    for a, t in enumerate(ids):
        for b, p in enumerate(ids):
            share = mat[t, p] / rows[t] if rows[t] > 0 else 0.0
            shade = int(round(255 * (1 - share)))
            color = f"rgb({shade},{shade},255)" if t != p else f"rgb({shade},255,{shade})"
            parts.append(f'<rect x="{label_w + b * cell}" y="{label_w + a * cell}" width="{cell}" height="{cell}" '
                         f'fill="{color}" stroke="#eee" stroke-width="0.5"><title>truth {_esc(classes[t])}, '
                         f'predicted {_esc(classes[p])}: {_pct(share)}% ({int(mat[t, p])} px)</title></rect>')
            if cell >= 40 and mat[t, p] > 0:
                ink = "#fff" if share > 0.6 else "#000"
                parts.append(f'<text x="{label_w + b * cell + cell / 2}" y="{label_w + a * cell + cell / 2 + 4}" '
                             f'font-size="11" text-anchor="middle" fill="{ink}">{_pct(share, 0) if share >= 0.005 else "&lt;1"}</text>')
    parts.append("</svg>")
    return "".join(parts)


def curve_chart(records: Sequence[dict[str, Any]]) -> str:
    """Validation mIoU and pixAcc against the iteration, from a run's metrics.jsonl records."""
    val = [r for r in records if r.get("split") == "val" and isinstance(r.get("mIoU"), (int, float))]
    if not val:
        return ""
    w, h, pad = 560, 220, 40
    last = max(r["iter"] for r in val) or 1

    def xy(r: dict[str, Any], key: str) -> str:
        return f"{pad + (w - 2 * pad) * r['iter'] / last:.1f},{h - pad - (h - 2 * pad) * r[key]:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="validation curve">',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#aaa"/>']
    for v in (0, 0.5, 1):
        y = h - pad - (h - 2 * pad) * v
        parts.append(f'<text x="{pad - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{int(v * 100)}%</text>')
    parts.append(f'<text x="{pad}" y="{h - pad + 14}" font-size="10">0</text>'
                 f'<text x="{w - pad}" y="{h - pad + 14}" font-size="10" text-anchor="end">iteration {last}</text>')
    for key, color in (("mIoU", "#1f77b4"), ("pixAcc", "#ff7f0e")):
        points = [r for r in val if isinstance(r.get(key), (int, float))]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{" ".join(xy(r, key) for r in points)}"/>')
        parts += [f'<circle cx="{xy(r, key).split(",")[0]}" cy="{xy(r, key).split(",")[1]}" r="3" fill="{color}">'
                  f'<title>iter {r["iter"]}: {key} {_pct(r[key])}%</title></circle>' for r in points]
    parts.append(f'<text x="{pad + 6}" y="{pad - 8}" font-size="11" fill="#1f77b4">val mIoU</text>'
                 f'<text x="{pad + 76}" y="{pad - 8}" font-size="11" fill="#ff7f0e">val pixAcc</text></svg>')
    return "".join(parts)


# -- the page ----------------------------------------------------------------------------------
STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
th.num,td.num{text-align:right}table.sortable th{cursor:pointer;background:#f4f4f4}
.headline span{display:inline-block;margin-right:2em;font-size:1.2em}.headline b{font-size:1.4em}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #555;vertical-align:middle}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;padding:6px;font-size:12px;width:520px}
.card img{display:block;width:100%;image-rendering:pixelated}.cols{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
.up{color:#080}.down{color:#b00}"""

SCRIPT = """document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var down = th.getAttribute('data-dir') !== 'desc';
      th.setAttribute('data-dir', down ? 'desc' : 'asc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y), r;
        if (!isNaN(nx) && !isNaN(ny)) { r = nx - ny; } else { r = String(x).localeCompare(String(y)); }
        return down ? -r : r;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
var filter = document.getElementById('class-filter');
if (filter) {
  filter.addEventListener('change', function () {
    var wanted = filter.value, shown = 0;
    document.querySelectorAll('.card').forEach(function (card) {
      var has = wanted === '' || card.getAttribute('data-classes').split(' ').indexOf(wanted) >= 0;
      card.style.display = has ? '' : 'none';
      if (has) { shown += 1; }
    });
    document.getElementById('filter-count').textContent = shown + ' shown';
  });
}"""


def _page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<style>{STYLE}</style></head><body>\n' + "\n".join(body) +
            f"\n<script>{SCRIPT}</script></body></html>\n")


def _num_cell(value: float | None, digits: int = 1) -> str:
    v = "-1" if value is None else f"{value:.6f}"
    return f'<td class="num" data-v="{v}">{_pct(value, digits)}</td>'


def _settings_table(record: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={record.get(k)}" for k in ("align_corners", "fusion", "window_placement", "convention"))
    rows = [("checkpoint", f"{record.get('checkpoint')} (sha256 {str(record.get('checkpoint_sha256', ''))[:12]})"),
            ("dataset", f"{record.get('dataset')}, split {record.get('split')}, backbone {record.get('backbone')}"),
            ("scales", "single scale" if record.get("scales") is None else record.get("scales")),
            ("flip", record.get("flip")), ("options", options),
            ("time", f"{record.get('date', '-')}: {record.get('num_images')} images in {record.get('seconds', 0):.1f} s"),
            ("device", record.get("device", "-"))]
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def render_report(record: dict[str, Any], classes: Sequence[str], palette: np.ndarray,
                  worst: Sequence[tuple[dict[str, Any], str]], curve: Sequence[dict[str, Any]] | None) -> str:
    """The report page. ``record`` is metrics.json's content (with ``confusion``); ``worst`` pairs
    each shown image's per-image row (class names) with its picture's path relative to the page;
    ``curve`` holds the training run's metrics.jsonl records (None: not from a segkit run)."""
    confusion = np.asarray(record["confusion"], np.int64)
    gt = confusion.sum(1)
    total = max(int(gt.sum()), 1)
    iou = [record["IoU"][c] for c in classes]
    acc = [record["acc"][c] for c in classes]
    body = [f"<h1>Evaluation report: {_esc(record.get('dataset'))} {_esc(record.get('split'))}</h1>",
            '<p class="headline">' + "".join(
                f"<span>{k} <b>{_pct(record.get(k), 2)}</b></span>" for k in ("mIoU", "pixAcc", "mAcc", "fwIoU")) +
            f"<span>images <b>{record.get('num_images')}</b></span></p>",
            f"<p>mIoU is the mean over the {_esc(record.get('convention'))} classes (over all: "
            f"{_pct(record.get('mIoU_all'), 2)}, over present: {_pct(record.get('mIoU_present'), 2)}); "
            f"{int(gt.sum())} labelled pixels. Per-image numbers: <code>../per_image.jsonl</code>.</p>",
            "<h2>Settings</h2>", _settings_table(record)]

    body.append("<h2>Classes</h2><p>Click a column to sort.</p><div class=\"cols\"><table class=\"sortable\" "
                "id=\"classes\"><thead><tr><th>id</th><th>class</th><th class=\"num\">IoU %</th>"
                "<th class=\"num\">acc %</th><th class=\"num\">pixels %</th><th class=\"num\">predicted %</th>"
                "</tr></thead><tbody>")
    predicted = confusion.sum(0)
    for i, name in enumerate(classes):
        body.append(f'<tr><td data-v="{i}">{i}</td><td data-v="{_esc(name)}"><span class="swatch" '
                    f'style="background:{_hex(palette[i])}"></span> {_esc(name)}</td>{_num_cell(iou[i])}'
                    f'{_num_cell(acc[i])}{_num_cell(gt[i] / total, 2)}{_num_cell(predicted[i] / total, 2)}</tr>')
    body.append(f"</tbody></table><div>{bar_chart(classes, iou, palette)}</div></div>")

    body.append("<h2>Confusions that cost the most</h2>")
    confusions = top_confusions(confusion, classes)
    body.append("<ol>" + "".join(
        f"<li>truth <b>{_esc(c['truth'])}</b> predicted as <b>{_esc(c['pred'])}</b>: {_pct(c['share'])}% of "
        f"{_esc(c['truth'])}'s pixels ({c['pixels']} px)</li>" for c in confusions) + "</ol>"
        if confusions else "<p>No pixel was confused.</p>")

    ids = heatmap_classes(confusion)
    shown = "all classes" if len(ids) == len(classes) else (
        f"the {len(ids)} classes with the most wrongly labelled pixels (of {len(classes)})")
    body.append(f"<h2>Confusion matrix</h2><p>Rows: truth, columns: prediction, each row normalised to its "
                f"class's pixels; {shown}. Hover a cell for its numbers.</p>{heatmap(confusion, classes, ids)}")

    body.append(f"<h2>Worst images</h2><p>The {len(worst)} images of lowest per-image mIoU (over the classes "
                "in their truth or prediction). Each: image | prediction | truth | errors (wrong pixels "
                "red, ignored pixels grey).</p>")
    if worst:
        class_id = {name: i for i, name in enumerate(classes)}
        held = sorted({c for row, _ in worst for c in row["classes"]}, key=class_id.__getitem__)
        body.append('<p><label>Images holding <select id="class-filter"><option value="">any class</option>' +
                    "".join(f'<option value="{class_id[c]}">{_esc(c)}</option>' for c in held) +
                    f'</select></label> <span id="filter-count">{len(worst)} shown</span></p><div class="cards">')
        for row, src in worst:
            ids_held = " ".join(str(class_id[c]) for c in row["classes"])
            body.append(f'<div class="card" data-classes="{ids_held}"><img src="{_esc(src)}" alt="{_esc(row["name"])}">'
                        f'<b>{_esc(row["name"])}</b>: mIoU {_pct(row["mIoU"])}%, pixAcc {_pct(row["pixAcc"])}%, '
                        f'worst class {_esc(row["worst"])} (IoU {_pct(row["worst_IoU"])}%), '
                        f'{row["labelled"]} labelled px<br>classes: {_esc(", ".join(row["classes"]))}</div>')
        body.append("</div>")

    body.append("<h2>Validation curve</h2>")
    chart = curve_chart(curve) if curve else ""
    body.append(chart or ("<p>The checkpoint's training run has no validation records.</p>" if curve is not None
                          else "<p>The checkpoint does not come from a segkit run directory with a "
                               "metrics.jsonl.</p>"))
    return _page(f"segkit report: {record.get('dataset')} {record.get('split')}", body)


def named_row(row: dict[str, Any], name: str, classes: Sequence[str]) -> dict[str, Any]:
    """A per-image row of the loop (class ids) as per_image.jsonl holds it (image name, class names)."""
    return {"name": name, "index": row["index"], "labelled": row["labelled"], "pixAcc": row["pixAcc"],
            "mIoU": row["mIoU"], "classes": [classes[c] for c in row["classes"]],
            "worst": None if row["worst"] is None else classes[row["worst"]], "worst_IoU": row["worst_IoU"]}


def write_report(out_dir: Path, record: dict[str, Any], classes: Sequence[str], palette: np.ndarray,
                 rows_by_index: dict[int, dict[str, Any]],
                 worst: Sequence[tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]],
                 curve: Sequence[dict[str, Any]] | None, ignore_index: int = 255) -> Path:
    """``out_dir/index.html`` with the worst images' pictures in ``out_dir/worst/``; returns the page's path.
    ``worst`` holds the kept (loop row, image, truth, prediction) of :meth:`WorstImages.gathered`."""
    shown = []
    for rank, (row, image, mask, pred) in enumerate(worst):
        src = f"worst/{rank:03d}.png"
        write_png(out_dir / src, Image.fromarray(worst_picture(image, pred, mask, palette, ignore_index)))
        shown.append((rows_by_index[row["index"]], src))
    page = out_dir / "index.html"
    write_text_atomic(page, render_report(record, classes, palette, shown, curve))
    return page


# -- two evaluations compared ------------------------------------------------------------------
def read_evaluation(path: str | Path) -> tuple[Path, dict[str, Any], list[dict[str, Any]] | None]:
    """An evaluation's metrics.json (``path`` is it or its directory) and its per_image.jsonl rows
    (None when there is none)."""
    path = Path(path)
    metrics = path / "metrics.json" if path.is_dir() else path
    if not metrics.is_file():
        raise ConfigError(f"{path}: no such file; expected an evaluation's run directory or its metrics.json")
    try:
        record = json.loads(metrics.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("IoU"), dict):
            raise ValueError("no per-class IoU")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{metrics}: not an evaluation's metrics.json ({e})") from None
    per_image = metrics.parent / "per_image.jsonl"
    rows = None
    if per_image.is_file():
        try:
            rows = [json.loads(line) for line in per_image.read_text().splitlines() if line.strip()]
        except ValueError as e:
            raise ConfigError(f"{per_image}: not per-image rows ({e})") from None
    return metrics, record, rows


def _signed(value: float | None) -> str:
    if value is None:
        return '<td class="num" data-v="0">-</td>'
    css = "up" if value > 0 else "down" if value < 0 else ""
    return f'<td class="num {css}" data-v="{value:.6f}">{100 * value:+.1f}</td>'


def render_comparison(a: tuple[Path, dict[str, Any], list[dict[str, Any]] | None],
                      b: tuple[Path, dict[str, Any], list[dict[str, Any]] | None],
                      changed: int = CHANGED_IMAGES) -> str:
    """The page comparing evaluations ``a`` and ``b`` (:func:`read_evaluation`) of one dataset;
    ConfigError when they evaluated different datasets, splits or classes."""
    (path_a, ra, rows_a), (path_b, rb, rows_b) = a, b
    for key in ("dataset", "split"):
        if ra.get(key) != rb.get(key):
            raise ConfigError(f"{path_a} and {path_b} evaluate different datasets ({key} {ra.get(key)!r} vs "
                              f"{rb.get(key)!r}); compare evaluations of the same dataset")
    if list(ra["IoU"]) != list(rb["IoU"]):
        raise ConfigError(f"{path_a} and {path_b} evaluate different classes ({len(ra['IoU'])} vs {len(rb['IoU'])}, "
                          f"or other names); compare evaluations of the same dataset")
    classes = list(ra["IoU"])
    body = [f"<h1>Two evaluations of {_esc(ra.get('dataset'))} {_esc(ra.get('split'))}</h1>",
            "<table><thead><tr><th></th><th>A</th><th>B</th><th class=\"num\">B - A</th></tr></thead><tbody>",
            f"<tr><th>metrics.json</th><td>{_esc(path_a)}</td><td>{_esc(path_b)}</td><td></td></tr>",
            f"<tr><th>checkpoint</th><td>{_esc(ra.get('checkpoint'))}</td><td>{_esc(rb.get('checkpoint'))}</td><td></td></tr>",
            f"<tr><th>scales, flip</th><td>{_esc(ra.get('scales'))}, {_esc(ra.get('flip'))}</td>"
            f"<td>{_esc(rb.get('scales'))}, {_esc(rb.get('flip'))}</td><td></td></tr>"]
    for key in ("mIoU", "pixAcc", "mAcc", "fwIoU"):
        va, vb = ra.get(key), rb.get(key)
        body.append(f"<tr><th>{key} %</th>{_num_cell(va, 2)}{_num_cell(vb, 2)}"
                    f"{_signed(None if va is None or vb is None else vb - va)}</tr>")
    body.append("</tbody></table><h2>Classes</h2><p>Click a column to sort.</p><table class=\"sortable\" "
                "id=\"classes\"><thead><tr><th>class</th><th class=\"num\">IoU A %</th><th class=\"num\">IoU B %</th>"
                "<th class=\"num\">B - A</th></tr></thead><tbody>")
    for name in classes:
        va, vb = ra["IoU"][name], rb["IoU"][name]
        body.append(f'<tr><td data-v="{_esc(name)}">{_esc(name)}</td>{_num_cell(va)}{_num_cell(vb)}'
                    f"{_signed(None if va is None or vb is None else vb - va)}</tr>")
    body.append("</tbody></table>")
    body.append("<h2>Images that changed most</h2>")
    if rows_a is None or rows_b is None:
        body.append("<p>Both evaluations need a per_image.jsonl for this.</p>")
    else:
        by_name = {r["name"]: r for r in rows_a}
        pairs = [(by_name[r["name"]], r) for r in rows_b
                 if r["name"] in by_name and r["mIoU"] is not None and by_name[r["name"]]["mIoU"] is not None]
        pairs.sort(key=lambda p: (-abs(p[1]["mIoU"] - p[0]["mIoU"]), p[0]["name"]))
        body.append(f"<p>The {min(changed, len(pairs))} of {len(pairs)} images in both whose per-image mIoU "
                    "changed most.</p><table class=\"sortable\" id=\"images\"><thead><tr><th>image</th>"
                    "<th class=\"num\">mIoU A %</th><th class=\"num\">mIoU B %</th><th class=\"num\">B - A</th>"
                    "<th>worst class A</th><th>worst class B</th></tr></thead><tbody>")
        for ia, ib in pairs[:changed]:
            body.append(f'<tr><td data-v="{_esc(ia["name"])}">{_esc(ia["name"])}</td>{_num_cell(ia["mIoU"])}'
                        f'{_num_cell(ib["mIoU"])}{_signed(ib["mIoU"] - ia["mIoU"])}<td>{_esc(ia["worst"])}</td>'
                        f'<td>{_esc(ib["worst"])}</td></tr>')
        body.append("</tbody></table>")
    return _page(f"segkit comparison: {ra.get('dataset')} {ra.get('split')}", body)


def write_comparison(run_a: str | Path, run_b: str | Path, out: str | Path) -> Path:
    """``segkit-report RUN_A RUN_B``: the comparison page written to ``out``."""
    page = render_comparison(read_evaluation(run_a), read_evaluation(run_b))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    return out
