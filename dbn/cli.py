"""``dbn``: use a saved model from the shell.

::

    dbn info MODEL                          # layers, kind, the metrics it was saved with
    dbn evaluate MODEL DATA                 # error rate on labelled data
    dbn predict MODEL DATA [-o labels.csv]  # one predicted label per example
    dbn features MODEL DATA OUT_DIR [--layer -1]   # hidden features as Parquet

``DATA`` is a directory of Parquet shards (``x``, optional ``y``, as
``examples/mnist_dbn.py prepare`` writes them), one Parquet file, or an IDX
images file (gzipped or not; ``--labels`` gives its IDX labels file).

    dbn features MODEL t10k-images-idx3-ubyte.gz OUT_DIR --labels t10k-labels-idx1-ubyte.gz
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click
import numpy as np

from . import model as _model


def _load(path: str) -> _model.Model:
    try:
        return _model.load(path)
    except FileNotFoundError:
        raise click.ClickException(f"model file {path} does not exist") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


_LABELS_WITH_IDX = "--labels goes with an IDX images file; Parquet data carries its labels in column 'y'"


def _is_idx(path: Path) -> bool:
    if path.is_dir():
        return False
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "idx" in name.rsplit(".", 1)[-1] or "-idx" in name or name.endswith("-ubyte")


def _data(path: str, labels: str | None, n_features: int) -> tuple[np.ndarray, np.ndarray | None]:
    from .data import read_idx, read_parquet_dir

    from iterreduce.job import is_uri

    p = Path(path)
    if not is_uri(path) and not p.exists():
        raise click.ClickException(f"data {path} does not exist")
    try:
        if not is_uri(path) and _is_idx(p):
            x = read_idx(p)
            y = read_idx(labels).astype(np.int64) if labels else None
            if y is not None and y.ndim != 1:
                raise click.ClickException(f"{labels} is not a labels file: it holds an array of shape "
                                           f"{y.shape}, labels are one number per example (images there?)")
            if y is not None and len(y) != len(x):
                raise click.ClickException(f"{labels} holds {len(y)} labels for the {len(x)} images of {path}")
            return x.reshape(len(x), math.prod(x.shape[1:])), y  # 0 images too
        if labels:
            raise click.ClickException(_LABELS_WITH_IDX)
        return read_parquet_dir(path, n_features=n_features)
    except (OSError, ValueError) as exc:  # IDXError, InputError, RecordError are ValueErrors
        raise click.ClickException(str(exc)) from None


def _call(fn, *args):
    try:
        return fn(*args)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Use a trained DBN model (model.avro): evaluate, predict, extract features."""


@main.command()
@click.argument("model_file", metavar="MODEL")
def info(model_file: str) -> None:
    """The model's kind, layer sizes and the metrics it was saved with."""
    m = _load(model_file)
    click.echo(f"{model_file}: {m.kind}, layers {'-'.join(map(str, m.sizes))}")
    metrics = m.meta.get("metrics")
    if isinstance(metrics, dict):
        click.echo("metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                           for k, v in sorted(metrics.items())))


@main.command()
@click.argument("model_file", metavar="MODEL")
@click.argument("data", metavar="DATA")
@click.option("--labels", help="IDX labels file, with an IDX images DATA")
def evaluate(model_file: str, data: str, labels: str | None) -> None:
    """The error rate of MODEL on the labelled examples in DATA."""
    m = _load(model_file)
    x, y = _data(data, labels, m.sizes[0])
    if y is None:
        raise click.ClickException(f"{data} has no labels (Parquet column 'y', or --labels for IDX)")
    if not len(y):
        raise click.ClickException(f"{data} holds no examples: there is no error rate to give")
    err = _call(m.error_rate, x, y)
    click.echo(json.dumps({"examples": len(y), "errors": int(round(err * len(y))), "error_rate": err}))


@main.command()
@click.argument("model_file", metavar="MODEL")
@click.argument("data", metavar="DATA")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="write here instead of stdout")
def predict(model_file: str, data: str, output: str | None) -> None:
    """One line per example of DATA: its row number and predicted label (CSV)."""
    m = _load(model_file)
    x, _ = _data(data, None, m.sizes[0])
    pred = _call(m.predict, x)
    try:
        out = open(output, "w") if output else sys.stdout
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
    try:
        out.write("row,label\n")
        out.writelines(f"{i},{int(k)}\n" for i, k in enumerate(pred))
    finally:
        if output:
            out.close()


@main.command()
@click.argument("model_file", metavar="MODEL")
@click.argument("data", metavar="DATA")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--layer", type=int, default=-1, show_default=True,
              help="hidden layer: 1 = first, -1 = top")
@click.option("--labels", help="IDX labels file, with an IDX images DATA (written as column y)")
def features(model_file: str, data: str, out_dir: str, layer: int, labels: str | None) -> None:
    """Write the activations of a hidden layer for the examples in DATA to OUT_DIR: one
    Parquet file per input file (features, y and the input's other columns), or, for an IDX
    images file, one named after it (features, and y from --labels)."""
    from iterreduce.job import is_uri

    m = _load(model_file)
    p = Path(data)
    if is_uri(data):
        raise click.ClickException(f"dbn features reads local files, not {data}: copy them here first "
                                   "(hdfs dfs -get), or use dbn.model.features from Python")
    if not p.exists():
        raise click.ClickException(f"data {data} does not exist")
    try:
        if _is_idx(p):
            m.layer_index(layer)  # a bad layer before reading the data
            x, y = _data(data, labels, m.sizes[0])
            name = (p.name[:-3] if p.name.endswith(".gz") else p.name) + ".parquet"
            written = [_model.export_features_arrays(m, x, y, layer, out_dir, name=name)]
        elif labels:
            raise click.ClickException(_LABELS_WITH_IDX)
        else:
            written = _model.export_features(m, data, layer, out_dir)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc).removeprefix("export_features: ")) from None
    for p in written:
        click.echo(str(p))
    click.echo(f"{len(written)} file(s) of layer {m.layer_index(layer)} features in {out_dir}", err=True)


if __name__ == "__main__":
    main()
