"""Prediction files: the output formats of `classify`, the settings they were computed with, and how far
an interrupted run got (what `--resume` continues from).

    table  one image a line, aligned            csv    image,rank,label,probability (one label a line)
    jsonl  one JSON object per image a line     json   one document, written at the end
    parquet  columns path, labels, probabilities, error (null when read): unreadable images are rows too

With --explain (`Explained` rows) each label also has its `Peak`, where its heat map peaks: csv adds the
columns left,top,right,bottom,peak_score; json and jsonl add "box": [left, top, right, bottom] and
"peak_score" to each prediction; parquet adds the columns boxes (a [left, top, right, bottom] per label)
and peak_scores; the table adds the box only, as "@left,top,right,bottom" after the probability (the
score is on the method's own scale, which means nothing beside a probability to a reader).

Next to `OUTPUT` the writer keeps `OUTPUT.clipzsl.json` (`ClassifySettings`): the model's weights,
labels, templates, top k and format the rows were computed with; a resumed run appends only under
the same ones. csv and jsonl are written as images are classified (each chunk flushed to disk, so a
killed run keeps every completed row) and can be resumed; json and parquet are written whole.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Literal, NamedTuple, Sequence, Union, cast

from .errors import InputError
from .images import ImageLoadError
from .prompts import ClassEntry
from .records import RecordError, canonical, dumps, load
from .store import atomic_write, digest

log = logging.getLogger(__name__)

#: the formats `classify` writes; csv and jsonl can be resumed
Format = Literal["table", "csv", "json", "jsonl", "parquet"]
PREDICTION_FORMATS = ("table", "csv", "json", "jsonl", "parquet")
RESUMABLE = ("csv", "jsonl")
#: next to a predictions file FILE: FILE + this, the settings its rows were computed with
SETTINGS_SUFFIX = ".clipzsl.json"

#: per image: its top k (label, probability), best first
Predictions = list[tuple[str, float]]
#: the columns of a CSV output, and those --explain adds
CSV_COLUMNS = ["image", "rank", "label", "probability"]
PEAK_COLUMNS = ["left", "top", "right", "bottom", "peak_score"]


@dataclass(frozen=True)
class Peak:
    """Where a label is in its image (`maps.peak_box`): the (left, top, right, bottom) pixels of the peak
    region of its heat map, and the map's value at the peak (on the method's own scale)."""

    box: tuple[int, int, int, int]
    score: float


class Explained(NamedTuple):
    """An image's predictions with each label's `Peak` (classify --explain)."""

    predictions: Predictions
    peaks: list[Peak]


#: a row of output: an image and its predictions (with their peaks), or why it could not be read
Row = tuple[str, Union[Predictions, Explained, ImageLoadError]]
#: a row of an image that was read
Scored = tuple[str, Union[Predictions, Explained]]


def _labels(preds: Predictions | Explained) -> list[tuple[str, float, Peak | None]]:
    """(label, probability, its peak or None), best first."""
    if isinstance(preds, Explained):
        return [(label, p, peak) for (label, p), peak in zip(preds.predictions, preds.peaks)]
    return [(label, p, None) for label, p in preds]


def _record(image: str, preds: Predictions | Explained) -> dict:
    return {"image": image, "predictions": [
        {"label": label, "probability": p, **({"box": list(peak.box), "peak_score": peak.score} if peak else {})}
        for label, p, peak in _labels(preds)]}


def format_predictions(rows: Sequence[Scored], fmt: str) -> str:
    """The whole output of `rows` in a text format (table, csv, json or jsonl)."""
    if fmt == "json":
        return json.dumps([_record(image, preds) for image, preds in rows], indent=2) + "\n"
    width = max([len("image")] + [len(image) for image, _ in rows])
    explained = any(isinstance(preds, Explained) for _, preds in rows)
    return prediction_header(fmt, width, explained) + prediction_rows(rows, fmt, width)


def prediction_header(fmt: str, width: int, explained: bool = False) -> str:
    """The first line of a table or CSV output (none for JSON lines); `width`: the table's image column;
    `explained`: the rows have peaks (--explain)."""
    if fmt == "csv":
        return ",".join(CSV_COLUMNS + (PEAK_COLUMNS if explained else [])) + "\n"
    return f"{'image':<{width}}  predictions\n" if fmt == "table" else ""


def _csv_rows(rows: Sequence[Scored]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for image, preds in rows:
        writer.writerows([image, rank, label, f"{p:.6f}", *([*peak.box, f"{peak.score:.6f}"] if peak else [])]
                         for rank, (label, p, peak) in enumerate(_labels(preds), 1))
    return out.getvalue()


def _table_label(label: str, p: float, peak: Peak | None) -> str:
    return f"{label} ({p:.1%})" + (" @" + ",".join(map(str, peak.box)) if peak else "")


def prediction_rows(rows: Sequence[Scored], fmt: str, width: int) -> str:
    """Rows of a table, CSV or JSON-lines output, one image (CSV: one label) per line, so they can be
    written as they are computed."""
    if fmt == "jsonl":
        return "".join(json.dumps(_record(image, preds)) + "\n" for image, preds in rows)
    if fmt == "csv":
        return _csv_rows(rows)
    return "".join(f"{image:<{width}}  " + "  ".join(_table_label(*scored) for scored in _labels(preds)) + "\n"
                   for image, preds in rows)


def drop_incomplete_line(path: Path) -> None:
    """Cut a last line without its newline (what a run killed mid-write may leave), with a warning."""
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end > 0:
            step = min(end, 1 << 16)
            f.seek(end - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                end = end - step + newline + 1
                break
            end -= step
        if end < size:
            f.truncate(end)
            log.warning("%s: dropped an incomplete last line (left by an interrupted run)", path)


def classified_images(path: Path, fmt: str, top_k: int) -> set[str]:
    """The images an earlier run wrote completely into a csv or jsonl output. A torn last line is cut off,
    and so are the CSV rows of a last image with fewer ranks than the images before it (or than `top_k`
    when it is the only one): that image is classified again."""
    if not path.exists():
        return set()
    drop_incomplete_line(path)
    return _jsonl_images(path) if fmt == "jsonl" else _csv_images(path, top_k)


def _jsonl_images(path: Path) -> set[str]:
    done: set[str] = set()
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                done.add(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError) as err:
                raise InputError(f"{path}:{number}: not a classify JSON-lines row ({err}); give the --format it "
                                 "was written in, or another --output") from err
    return done


def _csv_images(path: Path, top_k: int) -> set[str]:
    done: set[str] = set()
    offset, last_start = 0, 0
    counts: list[int] = []
    row: list[str] = []
    header: list[str] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            row = next(csv.reader([line.decode("utf-8")]), [])
            header = row if number == 1 else header
            if row not in (CSV_COLUMNS, CSV_COLUMNS + PEAK_COLUMNS) if number == 1 else (
                    len(row) != len(header) or not row[1].isdigit() or not (counts or row[1] == "1")):
                raise InputError(f"{path}:{number}: not a classify CSV row ({','.join(CSV_COLUMNS)}[,"
                                 f"{','.join(PEAK_COLUMNS)}]); give the --format it was written in, or another "
                                 "--output")
            if number > 1 and row[1] == "1":
                last_start = offset
                counts.append(0)
                done.add(row[0])
            if number > 1:
                counts[-1] += 1
            offset += len(line)
    if counts and counts[-1] < (max(counts[:-1]) if len(counts) > 1 else top_k):
        os.truncate(path, last_start)
        done.discard(row[0])
    return done


@dataclass(frozen=True)
class ClassifySettings:
    """What the rows of a predictions file depend on: a resumed run appends only under the same ones.
    The schema of OUTPUT.clipzsl.json (sealed: read through `clipzsl.records`)."""

    model: str  # the spec given (said in messages); the weights are `fingerprint`
    fingerprint: str
    labels: int
    labels_sha256: str  # of the normalised label entries (names, synonyms, prompts)
    templates: int
    templates_sha256: str
    top_k: int
    format: Format
    base: str  # the folder relative image paths in the output are relative to
    record_sha256: str = ""
    #: --explain's heat-map method (None: no peaks; "": the model's default, until the model is loaded)
    explain: str | None = None
    zoom: bool = False  # scored through the attention-guided zoom (classify --zoom)

    @classmethod
    def of(cls, model_spec: str, entries: Sequence[ClassEntry], templates: Sequence[str], top_k: int,
           fmt: str, explain: str | None = None, zoom: bool = False) -> "ClassifySettings":
        """This run's settings; the model's weights (`fingerprint`) are filled in once it is loaded."""
        entries_text = canonical([asdict(e) for e in entries]).decode()
        return cls(model_spec, "", len(entries), digest(entries_text, 64), len(templates),
                   digest(canonical(list(templates)).decode(), 64), top_k, cast(Format, fmt), os.getcwd(),
                   explain=explain, zoom=zoom)


def settings_path(output: str | os.PathLike) -> Path:
    """Where the settings of a predictions file are kept."""
    return Path(str(output) + SETTINGS_SUFFIX)


#: the settings a resumed run compares, and the option that sets each
RESUME_FLAGS = {"labels": "--labels", "templates": "--templates", "top_k": "--top-k", "format": "--format",
                "fingerprint": "--model", "explain": "--explain/--method", "zoom": "--zoom"}


def saved_settings(output: str | os.PathLike) -> ClassifySettings | None:
    """The settings a non-empty `output` was written with (None: no rows to resume from); an output
    without them, or with damaged or edited ones, is refused: resuming it could mix two runs."""
    path = settings_path(output)
    output = Path(output)
    if not output.is_file() or not output.stat().st_size:
        return None
    again = f"run without --resume to write {output} again, or give another --output"
    try:
        return load(ClassifySettings, path)
    except FileNotFoundError:
        raise InputError(f"{output}: no {path.name} next to it saying which model, labels, templates and --top-k "
                         f"its rows were computed with (written by an older clipzsl?), so --resume could mix two "
                         f"runs in it; {again}") from None
    except RecordError as err:
        raise InputError(f"{err}; {again}") from err


def _describe(settings: ClassifySettings, field: str) -> str:
    """A setting as a message names it."""
    if field in ("labels", "templates"):
        return f"{getattr(settings, field)} {field} (sha256 {getattr(settings, field + '_sha256')[:12]})"
    if field == "explain":
        if settings.explain is None:
            return "no --explain"
        return f"--explain by heat-map method {settings.explain!r}" if settings.explain else \
            "--explain by the model's default heat-map method"
    if field == "zoom":
        return "--zoom" if settings.zoom else "no --zoom"
    return f"{settings.model} (weights {settings.fingerprint})" if field == "fingerprint" else \
        str(getattr(settings, field))


def check_settings(output: str, saved: ClassifySettings, wanted: ClassifySettings, fields: Sequence[str]) -> None:
    """Refuse to append rows computed with other settings than the output's (the first that differs is named).
    A wanted `explain` of "" (the model's default method, not yet known) is taken to be the saved one's: it is
    checked again once the model is loaded."""
    if wanted.explain == "" and saved.explain is not None:
        wanted = replace(wanted, explain=saved.explain)
    describe = _describe
    for field in fields:  # a model is its weights: the same ones under another spec are the same model
        if describe(saved, field) != describe(replace(wanted, model=saved.model), field):
            flag = RESUME_FLAGS[field]
            raise InputError(f"{output}: written with {flag} giving {describe(saved, field)}, but this run has "
                             f"{describe(wanted, field)}; resuming would mix the two in one file: rerun with the "
                             f"{flag} it was written with, run without --resume to write it again, or give another "
                             "--output")


def check_resumable(output: str | None, fmt: str, resume: bool) -> None:
    """Refuse what cannot be written: a resume of an output that is not a csv or jsonl file, parquet to stdout."""
    if resume and (not output or fmt not in RESUMABLE):
        raise InputError("--resume needs --output FILE and --format csv or jsonl (it reads the images already in "
                         "FILE)")
    if fmt == "parquet" and not output:
        raise InputError("parquet predictions need a file: give --output FILE.parquet")


class PredictionWriter:
    """Rows of predictions into `output` (None: stdout) as they come, in any `PREDICTION_FORMATS`; with
    `append`, after the rows already there (a resumed run). A file is opened, and its settings written,
    with its first row: a run where every image is unreadable leaves an earlier file untouched."""

    def __init__(self, output: str | None, fmt: str, settings: ClassifySettings, append: bool = False,
                 width: int = 0):
        self.output, self.fmt, self.settings, self.width = output, fmt, settings, width
        path = Path(output) if output else None
        self.fresh = not (append and path is not None and path.is_file() and path.stat().st_size)  # else: has a header
        self.append = append
        self.file: IO[str] | None = None
        self.whole: list[Row] = []  # json, parquet: written at the end

    def add(self, rows: Sequence[Row]) -> None:
        """Write `rows` (unreadable images are rows of parquet only), flushed to disk."""
        if self.fmt in ("json", "parquet"):
            self.whole += rows
            return
        read = [(image, preds) for image, preds in rows if not isinstance(preds, ImageLoadError)]
        if not read:
            return
        out = self._open()
        if self.fresh:  # the header just before the first row
            out.write(prediction_header(self.fmt, self.width, self.settings.explain is not None))
            self.fresh = False
        out.write(prediction_rows(read, self.fmt, self.width))
        out.flush()
        if self.output:
            os.fsync(out.fileno())  # durable: a killed run keeps every completed row

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Write the whole-file formats once every row is in (not after an error); close the file."""
        try:
            if kind is None:
                self._write_whole()
        finally:
            if self.output and self.file is not None:
                self.file.close()

    def _write_whole(self) -> None:
        if self.fmt == "parquet":
            self._save_settings()
            atomic_write(Path(str(self.output)), lambda f: _write_parquet(f, self.whole, self.settings.explain is not None))
            return
        read = [(image, p) for image, p in self.whole if not isinstance(p, ImageLoadError)]
        if self.fmt != "json" or not read:  # json: nothing when no image could be read
            return
        self._save_settings()
        text = format_predictions(read, "json")
        if self.output:
            atomic_write(Path(self.output), lambda f: f.write(text.encode()))
        else:
            sys.stdout.write(text)

    def _open(self) -> IO[str]:
        if self.file is None:
            if not self.output:
                self.file = sys.stdout
            else:
                if self.fresh:  # the settings, before the first row: what a later resume checks
                    self._save_settings()
                self.file = open(self.output, "a" if self.append else "w", encoding="utf-8", newline="")
        return self.file

    def _save_settings(self) -> None:
        if self.output:
            record = dumps(self.settings)
            atomic_write(settings_path(self.output), lambda f: f.write(record))


def _parquet_row(image: str, preds: Predictions | Explained | ImageLoadError, explained: bool) -> dict:
    """One image's parquet columns (`_write_parquet`)."""
    row: dict
    if isinstance(preds, ImageLoadError):
        row = {"path": image, "labels": [], "probabilities": None, "error": preds.reason}
        return {**row, "boxes": None, "peak_scores": None} if explained else row
    labels = _labels(preds)
    row = {"path": image, "labels": [label for label, _, _ in labels], "probabilities": [p for _, p, _ in labels],
           "error": None}
    if explained:
        row["boxes"] = [list(peak.box) for _, _, peak in labels if peak]
        row["peak_scores"] = [peak.score for _, _, peak in labels if peak]
    return row


def _write_parquet(file: IO[bytes], rows: Sequence[Row], explained: bool = False) -> None:
    """Rows as parquet: path, labels, probabilities, error (null when read; the image's reason when not), and
    with `explained` (--explain) boxes ([left, top, right, bottom] per label) and peak_scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [("path", pa.string()), ("labels", pa.list_(pa.string())), ("probabilities", pa.list_(pa.float32())),
              ("error", pa.string())]
    if explained:
        fields += [("boxes", pa.list_(pa.list_(pa.int32(), 4))), ("peak_scores", pa.list_(pa.float32()))]
    found = [_parquet_row(image, preds, explained) for image, preds in rows]
    pq.write_table(pa.Table.from_pylist(found, schema=pa.schema(fields)), file)
