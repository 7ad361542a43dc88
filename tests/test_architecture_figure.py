"""scripts/make_architecture_figure.py writes a PNG (the committed figures/architecture.png)."""
from helpers import run_script


def test_architecture_figure_writes_png(tmp_path):
    out = tmp_path / "sub" / "architecture.png"
    assert run_script("scripts/make_architecture_figure.py", "--out", out)[0] == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
