"""scripts/make_architecture_figure.py writes a PNG (the committed figures/architecture.png)."""
from scripts import make_architecture_figure as arch


def test_architecture_figure_writes_png(tmp_path):
    out = tmp_path / "sub" / "architecture.png"
    assert arch.main(["--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
