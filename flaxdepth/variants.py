"""python -m flaxdepth.variants [--variants-file F]: every registered variant with its fields.

The notebook's eight are built in; `--variants-file` adds a TOML file's `[variants.NAME]` tables
(see experiments/variants.toml). The sweep, bench and convert commands take the same option.
"""

from __future__ import annotations

import json
import sys

from flaxdepth import cli, registry

PROG = "python -m flaxdepth.variants"


def describe(spec: registry.Variant) -> str:
    """One line: the name, the fields that differ from the defaults, the description."""
    defaults = registry.Variant(spec.name, spec.activation)
    changed = [f"{key}={value}" for key, value in spec.fields().items()
               if key not in ("description", "activation", "notebook_class", "notebook_pair")
               and value != getattr(defaults, key)]
    return f"{spec.name:<24} {spec.activation:<10} {' '.join(changed):<56} {spec.description}"


@cli.command(PROG)
def main(argv=None) -> int:
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
    cli.add_variants_file_argument(p)
    p.add_argument("--json", action="store_true", help="print {name: every field} as one JSON object")
    args = p.parse_args(argv)
    cli.load_variants_files(args.variants_file)
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
