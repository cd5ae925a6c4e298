"""Draw docs/invoice-sample.png: page 1 of the sample invoice (tests/unit/adapters/test_pdf.py), at 150 dpi.

    .venv/bin/python docs/render_sample.py [--destinations 2] [--status confirmed|draft|preview] [--out PATH]

The PNG shows what a customer receives; regenerate it whenever a2bd/adapters/pdf.py changes its layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without install

import pypdfium2  # noqa: E402 - after the path above

from a2bd.adapters.pdf import render_invoice  # noqa: E402
from tests.unit.adapters.test_pdf import sample_document  # noqa: E402

DPI = 150


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--destinations", type=int, default=2, help="call destinations (first: local, long distance)")
    parser.add_argument("--status", default="confirmed", choices=("confirmed", "draft", "preview"))
    parser.add_argument("--page", type=int, default=1, help="which page to draw (1-based)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "invoice-sample.png")
    args = parser.parse_args()

    pdf = pypdfium2.PdfDocument(render_invoice(sample_document(args.destinations, status=args.status)))
    try:
        page = pdf[args.page - 1]
        image = page.render(scale=DPI / 72).to_pil()
        image.save(args.out, optimize=True)
        print(f"{args.out}: page {args.page} of {len(pdf)}, {image.width}×{image.height} px")
    finally:
        pdf.close()


if __name__ == "__main__":
    main()
