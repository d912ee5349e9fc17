"""flaxdepth.registry: variants as declared specs, from Python and from TOML files; every bad spec
is one line naming the file, the variant and the field, and registers nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flaxdepth import registry, variants

EXPERIMENT_VARIANTS = Path(__file__).resolve().parents[1] / "experiments" / "variants.toml"


@pytest.fixture
def toml_file(tmp_path):
    """write(text) -> a TOML file holding `text`; names it declared that were not registered
    before are unregistered afterwards (the parity suite's stay)."""
    before = set(registry.variant_names())

    def write(text: str) -> Path:
        path = tmp_path / "my.toml"
        path.write_text(text)
        return path
    yield write
    for name in set(registry.variant_names()) - before:
        registry.unregister(name)


def test_builtins_are_the_notebooks_eight():
    assert registry.VARIANT_NAMES == ("tanh", "tanh_newinit", "elu", "elu_bn", "resnet", "tanh_bn_oldinit",
                                      "resnet_nobn", "elu_multihead")
    for spec in registry.VARIANTS.values():
        assert registry.validate(spec) is spec and spec.notebook_class and spec.notebook_pair


def test_a_toml_file_registers_its_variants(toml_file):
    path = toml_file('[variants.relu_he]\nactivation = "relu"\ninit = "he"\ninit_fan = "in"\nlr = 1\n'
                     '[variants.gn]\nactivation = "elu"\nnorm = "group"\nnorm_groups = 4\n')
    assert registry.load_variants(path) == ["relu_he", "gn"]
    assert {"relu_he", "gn"} <= set(registry.variant_names()[len(registry.VARIANTS):])
    spec = registry.get_variant("relu_he")
    assert (spec.activation, spec.init, spec.init_fan, spec.lr, spec.channels) == ("relu", "he", "in", 1.0, 4)
    assert registry.conv_init_std(spec, 8, 16) == pytest.approx((2 / (9 * 8)) ** 0.5)  # fan in


@pytest.mark.parametrize("init, scale", [("glorot", 1.0), ("he", 2.0), ("lecun", 1.0)])
@pytest.mark.parametrize("fan", ["in", "out"])
def test_init_gain_scales_the_gaussian_std(init, scale, fan):
    """std = gain * sqrt(scale / (9 * fan)): sigma_w^2 = 9 C_in std^2 = gain^2 * scale with fan in."""
    plain = registry.Variant("g", "tanh", init=init, init_fan=fan)
    gained = dataclasses.replace(plain, init_gain=1.3)
    fan_size = 9 * (8 if fan == "in" else 16)
    assert registry.conv_init_std(plain, 8, 16) == (scale / fan_size) ** 0.5
    assert registry.conv_init_std(gained, 8, 16) == pytest.approx(1.3 * (scale / fan_size) ** 0.5, rel=1e-15)
    normal = registry.Variant("n", "tanh", init="normal", init_std=0.3)
    assert registry.conv_init_std(normal, 8, 16) == 0.3  # normal's std is init_std alone
    with pytest.raises(registry.SpecError, match="set init_std instead of init_gain"):
        registry.validate(dataclasses.replace(normal, init_gain=1.3))


def test_a_spec_object_registers_and_resolves():
    spec = registry.Variant("my_elu_bn", "elu", norm="batch", init="glorot")
    try:
        assert registry.register(spec) is spec
        assert registry.resolve("my_elu_bn") is spec and registry.resolve(spec) is spec
    finally:
        registry.unregister("my_elu_bn")
    with pytest.raises(registry.UnknownVariantError, match="my_elu_bn"):
        registry.get_variant("my_elu_bn")


def test_a_toml_copy_of_a_builtin_has_its_fields(toml_file):
    """elu_bn's fields under another name: the same spec but for the name and the notebook facts."""
    builtin = registry.VARIANTS["elu_bn"]
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in builtin.fields().items()
             if k not in ("notebook_class", "notebook_pair")]
    registry.load_variants(toml_file("[variants.elu_bn_copy]\n" + "\n".join(lines) + "\n"))
    copy = registry.get_variant("elu_bn_copy")
    assert copy == dataclasses.replace(builtin, name="elu_bn_copy", notebook_class=None, notebook_pair=None)


def test_experiments_variants_file_is_valid():
    specs = registry.read_variants(EXPERIMENT_VARIANTS)
    assert {"relu_he", "selu_lecun", "tanh_delta_orthogonal", "resnet_skipinit", "elu_groupnorm"} <= {
        s.name for s in specs}
    assert all(s.description for s in specs)


BAD_SPECS = [
    # (TOML table body, what the one line must name)
    ('activation = "relu"\nwidth = 8', "field 'width': unknown field"),
    ('activation = "swish"', "field 'activation': 'swish' is not one of: tanh, elu, relu"),
    ('init = "he"', "field 'activation': missing (required)"),
    ('activation = "tanh"\ninit_std = -0.1', "field 'init_std': a standard deviation cannot be negative"),
    ('activation = "tanh"\nbias_std = -1.0', "field 'bias_std': a standard deviation cannot be negative"),
    ('activation = "tanh"\nchannels = -4', "field 'channels': must be a positive integer"),
    ('activation = "tanh"\nchannels = 2.5', "field 'channels': must be a positive integer"),
    ('activation = "tanh"\nnorm = "layer"', "field 'norm': 'layer' is not one of: none, batch, group"),
    ('activation = "tanh"\nnorm = "group"\nnorm_groups = 3', "field 'norm_groups': 3 groups do not divide"),
    ('activation = "tanh"\nresidual = "gated"\nresidual_gate_init = "zero"', "field 'residual_gate_init'"),
    ('activation = "tanh"\ninit = "kaiming"', "field 'init': 'kaiming' is not one of"),
    ('activation = "tanh"\ninit_fan = "both"', "field 'init_fan': 'both' is not one of: out, in"),
    ('activation = "tanh"\nheads = "all"', "field 'heads': 'all' is not one of: last, every_stage"),
    ('activation = "tanh"\nlr = 0', "field 'lr': must be positive"),
    ('activation = "tanh"\ninit_gain = 2.0', "field 'init_gain': scales the orthogonal and variance-scaling"),
    ('activation = "tanh"\nnotebook_pair = [6, 9]', "field 'notebook_pair': unknown field"),
]


@pytest.mark.parametrize("body, message", BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_bad_specs_name_file_variant_and_field_and_register_nothing(toml_file, body, message):
    path = toml_file(f'[variants.fine]\nactivation = "elu"\n\n[variants.mine]\n{body}\n')
    with pytest.raises(registry.SpecError) as error:
        registry.load_variants(path)
    text = str(error.value)
    assert text.startswith(f"{path}: variant 'mine', ") and message in text and "\n" not in text
    assert "fine" not in registry.variant_names()  # a bad file registers none of its variants


def test_delta_orthogonal_needs_c_in_at_most_c_out():
    """The notebook's widths satisfy it (1 -> C, C -> C, C -> 2C); the check guards the rule itself."""
    registry.validate(registry.Variant("d", "tanh", init="delta_orthogonal", channels=1))
    assert registry.stage_channels(1, 4) == (4, 8)
    from flaxdepth import models  # the initializer refuses C_in > C_out where it is asked to
    spec = registry.Variant("d", "tanh", init="delta_orthogonal")
    with pytest.raises(ValueError, match="C_in <= C_out"):
        models.conv_kernel_init(spec, 8, 4)


@pytest.mark.parametrize("text, message", [
    ('[variants.tanh]\nactivation = "tanh"\n', "variant 'tanh': name shadows the built-in variant"),
    ('[variants.x]\nactivation = "tanh"\n[variants.x', "not valid TOML"),
    ('[other]\nx = 1\n', "no [variants.NAME] tables"),
    ('[variants]\nx = 1\n', "variants.x must be a table"),
    ('[variants."my net"]\nactivation = "tanh"\n', "use letters, digits and underscores"),
])
def test_bad_files_are_one_line(toml_file, text, message):
    with pytest.raises(registry.SpecError, match="^" + str(toml_file(text)).replace(".", r"\.")) as error:
        registry.load_variants(toml_file(text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_registering_a_builtin_name_is_refused():
    with pytest.raises(registry.SpecError, match="shadows the built-in"):
        registry.register(registry.Variant("elu_bn", "elu"))


def exit_status(main, argv) -> int:
    """A command's exit status, whether its main returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("file, message", [
    ("missing.toml", "missing.toml: no such file"),
    ("bad.toml", "field 'init': 'kaiming' is not one of"),
])
def test_the_commands_report_a_bad_file_in_one_line(tmp_path, capsys, file, message):
    (tmp_path / "bad.toml").write_text('[variants.mine]\nactivation = "tanh"\ninit = "kaiming"\n')
    given = ["--variants-file", str(tmp_path / file)]
    from flaxdepth import bench, convert, sweep

    for main, argv in ((variants.main, given), (sweep.main, given + ["--variant", "mine", "--skip-parity"]),
                       (convert.main, ["to-flax", "--variant", "mine", "--depth", "3", "in.pt", "out.msgpack", *given]),
                       (bench.main, given + ["--variant", "mine"])):
        assert exit_status(main, argv) == 2, main
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), (main, err)


def test_variants_lists_every_variant_with_its_fields(capsys, toml_file):
    assert variants.main(["--variants-file", str(EXPERIMENT_VARIANTS)]) == 0
    out = capsys.readouterr().out
    for name in registry.VARIANT_NAMES + ("relu_he", "resnet_skipinit"):
        assert f"\n{name} " in out
    assert "residual=gated" in out and "init=he init_fan=in" in out
