"""The variants a per-variant test runs over: the whole registry, as the parity suite's, the
notebook's eight and the variants experiments/variants.toml declares (registered here)."""

from pathlib import Path

from flaxdepth import registry

DECLARED_VARIANTS = tuple(registry.load_variants(Path(__file__).resolve().parents[1] / "experiments" / "variants.toml"))
REGISTERED_VARIANTS = registry.variant_names()
