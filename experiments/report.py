"""Rebuild experiments/REPORT.md, its figures and README.md's findings table from experiments/results/.

    python experiments/report.py [--results DIR] [--out DIR] [--readme FILE]

Nothing is trained here: every number in the report is computed from the results files, and
whatever has no rows is shown as "not run". The work is split in three modules beside this file:
report_rows.py selects the runs of each table and computes the verdicts, report_figures.py draws
the figures, report_markdown.py writes REPORT.md and the findings table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling modules, also when this file is loaded by its path
    sys.path.insert(0, str(HERE))

import report_figures  # noqa: E402
import report_markdown  # noqa: E402
import report_rows  # noqa: E402

README = HERE.parent / "README.md"


def main(argv=None) -> int:
    """Read the results, write the figures, REPORT.md and (with the default --out) README.md's findings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder of *.jsonl results files")
    p.add_argument("--out", type=Path, default=HERE, help="folder for REPORT.md and figures/")
    p.add_argument("--readme", type=Path, default=None,
                   help="a README whose findings table (between <!-- findings:start --> and <!-- findings:end -->) "
                        "to rewrite; default: the repository's README.md when --out is the default, else none")
    args = p.parse_args(argv)
    readme = args.readme or (README if args.out.resolve() == HERE else None)
    selection = report_rows.select(args.results)
    figures = report_figures.draw(selection, args.out / "figures")
    link = Path(os.path.relpath(args.results.resolve(), args.out.resolve())).as_posix()
    (args.out / "REPORT.md").write_text(report_markdown.report(selection, link, args.out / "figures"))
    print(f"wrote {args.out / 'REPORT.md'} and {len(figures)} figures in {args.out / 'figures'}")
    if readme is not None:
        changed = report_markdown.write_findings(readme, report_markdown.findings_table(selection.verdicts))
        print(f"{'updated' if changed else 'kept'} the findings table of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
