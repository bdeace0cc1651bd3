"""ftctl run layer (config, run loading, engine, train, evaluate, merge, record), its studies (`launch.studies`) and
the `ftctl` CLI (`launch.cli`)."""

import importlib.util
import sys
from pathlib import Path

from launch.run.quiet import quiet

# Before any library is imported through this package: their import-time chatter (bitsandbytes probing CPU kernels,
# transformers' notices) stays out of the user's terminal; FTCTL_VERBOSE=1 shows it.
quiet()


def _check_not_shadowed() -> None:
    """ftctl's sibling packages must be the ones installed beside this one. `python -m launch.train` puts the current
    directory first on the path, where a user's own `tasks/` or `methods/` folder would be imported instead."""
    home = Path(__file__).resolve().parent.parent
    for name in ("ftctl", "tasks", "methods"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        locations = list(spec.submodule_search_locations or [])
        found = Path(spec.origin).parent if spec.origin else Path(locations[0] if locations else ".")
        if found.resolve() != home / name:
            print(
                f"error: {found} shadows ftctl's package '{name}' (installed in {home}): Python put the current "
                "directory first on the path; run from another directory, set PYTHONSAFEPATH=1, or use `ftctl train`",
                file=sys.stderr,
            )
            raise SystemExit(2)


_check_not_shadowed()
