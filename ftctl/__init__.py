"""ftctl's kernel: what tasks, methods, the run layer, studies and the CLI all stand on.

Errors, option declarations, registries, backbone loading and family detection, data reading, the general run
options, the closed vocabularies (task kinds, families) and the typed launch facts. It imports nothing of ftctl's
other packages (the layer contract in pyproject.toml keeps it so).
"""

__version__ = "0.1.0"
