"""ftctl run layer (config, run loading, engine, train, evaluate, merge, record), its studies (`launch.studies`) and
the `ftctl` CLI (`launch.cli`)."""

from launch.quiet import quiet

# Before any library is imported through this package: their import-time chatter (bitsandbytes probing CPU kernels,
# transformers' notices) stays out of the user's terminal; FTCTL_VERBOSE=1 shows it.
quiet()
