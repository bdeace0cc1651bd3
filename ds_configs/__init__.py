"""Data-only package: the files of this folder ship in the wheel, found through importlib.resources
(launch/run/configs.py)."""
