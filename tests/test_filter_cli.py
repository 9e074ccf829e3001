"""The shell of search inside a filter: `clipzsl search IDX QUERY --where ...` (exit 0, only matching paths; a bad
filter exits 2 naming its position) and `clipzsl index images --metadata CSV` (a bad CSV exits 2 before
anything is embedded)."""
import json
import subprocess
import sys

import pytest
from PIL import Image
from test_filter import photos

from clipzsl.cli import main
from clipzsl.metadata import METADATA_FILE


@pytest.fixture(scope="module")
def indexed(tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("filter-cli")
    photos(root / "p")
    (root / "meta.csv").write_text("path,stars\np/cats/red.png,5\np/dogs/blue.png,2\n")  # paths relative to the CSV
    assert main(["index", "images", str(root / "p"), "--out", str(root / "idx"), "--model", f"hf:{tiny_clip}",
                 "--metadata", str(root / "meta.csv")]) == 0
    return root


def test_search_where_prints_only_matching_paths(indexed):
    """Through the installed shell (a fresh process), as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "clipzsl.cli", "search", str(indexed / "idx"), "a red square",
                          "--where", "folder = 'dogs' or stars = 5", "--format", "json", "--top-k", "5"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = sorted(h["path"].rsplit("/", 2)[-2] + "/" + h["path"].rsplit("/", 1)[1] for h in json.loads(out.stdout))
    assert found == ["cats/red.png", "dogs/blue.png"]  # not cats/pink.png


@pytest.mark.parametrize("where, paths", [("folder = 'cats' and width > 512", ["red.png"]),
                                          ("stars >= 2 and folder != 'cats'", ["blue.png"]),
                                          ("name in ('pink.png') or stars is_not_a_word", None)])
def test_search_where_exit_status_and_output(indexed, capsys, where, paths):
    code = main(["search", str(indexed / "idx"), "red", "--where", where, "--format", "json"])
    out, err = capsys.readouterr()
    if paths is None:
        position = where.index("is_not_a_word") + 1  # 1-based, where the parser stopped
        assert code == 2 and out == "" and f"at position {position}:" in err and err.count("\n") == 1
    else:
        assert code == 0 and sorted(h["path"].rsplit("/", 1)[1] for h in json.loads(out)) == paths


def test_search_bad_filter_names_the_column_and_position(indexed, capsys):
    where = "folder = 'cats' and colour = 'red'"
    code = main(["search", str(indexed / "idx"), "red", "--where", where])
    err = capsys.readouterr().err
    assert code == 2 and f"at position {where.index('colour') + 1}:" in err and "no column 'colour'; the columns are path, folder, name, " \
                                                     "width, height, stars" in err


@pytest.mark.parametrize("content, says", [("name,x\na,1\n", "no `path` column"), ("path,x\na,1\na,2\n", "given twice")])
def test_index_images_bad_metadata_csv_exits_2_before_embedding(tiny_clip, tmp_path, capsys, monkeypatch, content,
                                                                 says):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(content)
    import clipzsl.image_index

    def no_embedding(*args, **kwargs):
        raise AssertionError("an image was embedded before the CSV was checked")
    monkeypatch.setattr(clipzsl.image_index, "embed_images", no_embedding)
    code = main(["index", "images", str(tmp_path / "a.png"), "--out", str(tmp_path / "idx"), "--model",
                 f"hf:{tiny_clip}", "--metadata", str(tmp_path / "m.csv")])
    err = capsys.readouterr().err
    assert code == 2 and says in err and str(tmp_path / "m.csv") in err
    assert not (tmp_path / "idx" / METADATA_FILE).exists()
