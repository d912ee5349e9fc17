"""python -m flaxdepth.variants [--variants-file F]: every registered variant with its fields.

The notebook's eight are built in; `--variants-file` adds a TOML file's `[variants.NAME]` tables
(see experiments/variants.toml). The sweep, bench and convert commands take the same option.
"""

from __future__ import annotations

import argparse
import json
import sys

from flaxdepth import registry
from flaxdepth.cli import quiet_on_closed_pipe

PROG = "python -m flaxdepth.variants"


def add_variants_file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants-file", action="append", default=[], metavar="FILE",
                   help="TOML file of your own variants ([variants.NAME] tables, experiments/variants.toml "
                        "has examples); repeat for several files")


def load_variants_files(paths: list[str]) -> list[str]:
    """Register every variant of the files (a SpecError names the file, variant and field);
    returns the declared names in order."""
    return [name for path in paths for name in registry.load_variants(path)]


def describe(spec: registry.Variant) -> str:
    """One line: the name, the fields that differ from the defaults, the description."""
    defaults = registry.Variant(spec.name, spec.activation)
    changed = [f"{key}={value}" for key, value in spec.fields().items()
               if key not in ("description", "activation", "notebook_class", "notebook_pair")
               and value != getattr(defaults, key)]
    return f"{spec.name:<24} {spec.activation:<10} {' '.join(changed):<56} {spec.description}"


@quiet_on_closed_pipe
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_variants_file_argument(p)
    p.add_argument("--json", action="store_true", help="print {name: every field} as one JSON object")
    args = p.parse_args(argv)
    try:
        load_variants_files(args.variants_file)
    except registry.SpecError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    specs = [registry.get_variant(name) for name in registry.variant_names()]
    if args.json:
        print(json.dumps({spec.name: spec.fields() for spec in specs}, indent=1))
        return 0
    print(f"{'variant':<24} {'activation':<10} {'fields other than the defaults':<56} description")
    for spec in specs:
        print(describe(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
