"""The study layer: comparison grids (`ftctl grid`) and their reports (`ftctl report`), above the run layer."""
