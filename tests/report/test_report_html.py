"""The HTML report page: escaped text, tables checked against their header, PNGs embedded as
base64 and nothing loaded from elsewhere."""

from __future__ import annotations

import base64
import re

import pytest

from calibrl.eval.plots import reliability_diagram
from calibrl.report.html import Section, image_html, render_report, table_html


def test_page_embeds_png_and_escapes_text(tmp_path):
    png = reliability_diagram([0.2, 0.9], [0, 1], tmp_path / "r.png")
    page = render_report("a <b> & c", [
        Section("tables", notes=["x < y"], tables=[("cap", ["arm", "acc"], [["<arm>", "0.500 ± 0.010"]])]),
        Section("figure", images=[(png, "reliability")]),
    ], intro=["intro & more"])
    assert "<title>a &lt;b&gt; &amp; c</title>" in page and "x &lt; y" in page and "intro &amp; more" in page
    assert "<td>&lt;arm&gt;</td><td>0.500 ± 0.010</td>" in page and "<caption>cap</caption>" in page
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(uri) == png.read_bytes()
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)


def test_bad_table_and_image_raise(tmp_path):
    with pytest.raises(ValueError, match="row of 1 cells under a header of 2"):
        table_html(["a", "b"], [["1"]])
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a PNG"):
        image_html(tmp_path / "x.png", "x")
    with pytest.raises(FileNotFoundError):
        image_html(tmp_path / "missing.png", "x")
