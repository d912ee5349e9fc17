"""python -m flaxdepth.convert: convert checkpoints between the PyTorch notebook and flaxdepth.

    python -m flaxdepth.convert to-flax  --variant elu_bn --depth 48 IN.pt      OUT.msgpack
    python -m flaxdepth.convert to-torch --variant elu_bn --depth 48 IN.msgpack OUT.pt

Torch side: a file written by `torch.save`, holding a state_dict with the notebook's keys, or a
dict with the state_dict under 'state_dict' or 'model_state_dict' (other entries are ignored).
`to-torch` writes a plain state_dict of tensors that `torch_ref.build(variant, depth)` (or the
notebook's class) loads with `load_state_dict(torch.load(OUT), strict=True)`.

Flax side: Flax's standard msgpack checkpoint, the bytes of `flax.serialization.to_bytes`
of the variables `{'params': ..., 'batch_stats': ...}` (scanned layers stacked along a leading
axis, see `flaxdepth.interop.layout`). Read it back with `load_flax` (nested dicts of numpy
arrays, no target needed) or `flax.serialization.from_bytes(target, data)`.
Every array keeps the checkpoint's dtype (float64 stays float64), so a round trip is bit-exact.
Neither file records its variant, and only keys and shapes are checked: tanh, tanh_newinit and
elu share every torch key, as do elu_bn and tanh_bn_oldinit, and the Flax trees of the
residual variants equal those of the plain ones with or without BatchNorm. Pass the right --variant.

Bad input exits with status 2 and one line on stderr; outputs are replaced atomically.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import torch
from flax import serialization

from flaxdepth import cli, interop, registry
from flaxdepth.interop import InteropError

PROG = "python -m flaxdepth.convert"
#: Keys under which training scripts commonly nest the state_dict in a larger checkpoint.
STATE_DICT_KEYS = ("state_dict", "model_state_dict")


def _write_atomically(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write through `write(file)` to a temp file beside `path`, then rename it over `path`:
    an interrupted or failed conversion never leaves a truncated checkpoint behind."""
    path = Path(path)
    if not path.parent.is_dir():  # else the error would name the temp file
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    # A random name beside the target (same filesystem, so os.replace is atomic); open() with
    # "xb" keeps the usual umask-based permissions, which mkstemp's 0600 would not.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def save_flax(path: str | os.PathLike, variables: Mapping) -> None:
    """Write Flax variables as a msgpack checkpoint (`flax.serialization.to_bytes`)."""
    data = serialization.to_bytes(jax.tree.map(np.asarray, dict(variables)))
    _write_atomically(path, lambda file: file.write(data))


def load_flax(path: str | os.PathLike) -> dict:
    """The variables of a msgpack checkpoint as nested dicts of numpy arrays."""
    data = Path(path).read_bytes()
    try:
        variables = serialization.msgpack_restore(data)
    except Exception as error:  # msgpack raises several unrelated types for foreign bytes
        raise InteropError(f"{path}: not a Flax msgpack checkpoint ({type(error).__name__})") from None
    if not isinstance(variables, dict):
        raise InteropError(f"{path}: not a Flax msgpack checkpoint (holds a {type(variables).__name__})")
    return variables


def load_torch(path: str | os.PathLike) -> Mapping[str, Any]:
    """The state_dict in a torch checkpoint file, unwrapped from 'state_dict'/'model_state_dict'."""
    with open(path, "rb") as file:  # a missing file is an OSError, reported as such
        try:
            # weights_only: unpickling a downloaded checkpoint must not run arbitrary code.
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for foreign files
            # Not torch's own message: for any non-torch file it is a long, misleading hint to
            # retry with weights_only=False.
            raise InteropError(
                f"{path}: not a torch state_dict checkpoint (torch.load(weights_only=True) raised "
                f"{type(error).__name__}); save one with torch.save(model.state_dict(), path)"
            ) from None
    if isinstance(checkpoint, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
        return checkpoint
    raise InteropError(f"{path}: holds a {type(checkpoint).__name__}, not a state_dict")


def save_torch(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write a state_dict of numpy arrays as torch tensors with `torch.save`."""
    # Copies: C-contiguous (no transposed views saved with odd strides) and writable
    # (torch.from_numpy warns about msgpack's read-only buffers).
    tensors = {key: torch.from_numpy(np.array(value, order="C")) for key, value in state_dict.items()}
    _write_atomically(path, lambda file: torch.save(tensors, file))


def torch_to_flax(variant: str, depth: int, source, target) -> dict:
    """Convert a torch checkpoint file to a Flax msgpack file; returns the variables."""
    state_dict = load_torch(source)
    # x64 on: interop holds the arrays as jax arrays, which would otherwise narrow float64 and
    # int64 (num_batches_tracked) to 32 bits and break the exact round trip.
    with jax.enable_x64(True):
        variables = jax.tree.map(np.asarray, interop.from_torch(variant, depth, state_dict))
    save_flax(target, variables)
    return variables


def flax_to_torch(variant: str, depth: int, source, target) -> dict[str, np.ndarray]:
    """Convert a Flax msgpack file to a torch state_dict file; returns the state_dict."""
    state_dict = interop.to_torch(variant, depth, load_flax(source))
    save_torch(target, state_dict)
    return state_dict


def _depth(text: str) -> int:
    try:
        return registry.check_depth(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {registry.NUM_STAGES}, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("direction", choices=("to-flax", "to-torch"))
    p.add_argument("--variant", required=True, metavar="NAME",
                   help=f"one of {', '.join(registry.VARIANT_NAMES)}, or a variant of a --variants-file")
    cli.add_variants_file_argument(p)
    p.add_argument("--depth", required=True, type=_depth, help="the notebook's k (k // 3 layers per stage)")
    p.add_argument("input", help="torch checkpoint (to-flax) or msgpack file (to-torch)")
    p.add_argument("output", help="file to write (replaced atomically)")
    return p.parse_args(argv)


@cli.command(PROG, also=(InteropError, OSError))
def main(argv=None) -> int:
    args = parse_args(argv)
    cli.load_variants_files(args.variants_file)
    registry.get_variant(args.variant)
    convert = torch_to_flax if args.direction == "to-flax" else flax_to_torch
    arrays = jax.tree.leaves(convert(args.variant, args.depth, args.input, args.output))
    print(f"wrote {args.output}: {args.variant} k={args.depth}, {len(arrays)} arrays, "
          f"{sum(a.size for a in arrays)} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
