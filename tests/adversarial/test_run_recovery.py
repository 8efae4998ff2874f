"""Finding 9 (run side): a root that lost a file is repaired by the next run, and the card never crashes on it.

On 3874b3d ``ctfactory run`` on a root whose image had been deleted died in publish_card with a
FileNotFoundError traceback, and the file was never regenerated (the case counted as done).
"""

from __future__ import annotations

from pathlib import Path

from _specs import tiny_spec
from catalog.report import build_report_html
from catalog.store import open_catalog
from catalog.verify import verify_catalog
from flows.generate import run_generate


def test_deleted_image_is_regenerated_bit_identically_and_recorded_once(prefect_backend, tmp_path):
    root = tmp_path / "ds"
    spec = tiny_spec(root, name="lost", seed=5, count=2, steps=2, runtime="{device: cpu}")
    first = run_generate(spec)
    assert first["n_passed"] == 2
    cat = open_catalog(root)
    row = cat.read_table("samples").to_pylist()[0]
    image = root / row["image_uri"]
    original = image.read_bytes()
    version = cat.version
    image.unlink()

    html = build_report_html(cat)  # the card survives the hole and says what to do
    assert f"{row['sample_id']}: no preview, its image or label cannot be read (missing)" in html
    assert not verify_catalog(cat).ok

    again = run_generate(spec)
    assert (again["generated"], again["skipped"]) == (1, 1)
    assert image.read_bytes() == original  # same seed, same bytes
    assert cat.version == version  # the identical record is not committed twice
    assert cat.read_table("samples").num_rows == 2
    report = verify_catalog(cat)
    assert report.ok and report.orphans == ()
    assert Path(again["card_uri"]).is_file()
