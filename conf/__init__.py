"""The Hydra config tree, shipped in the package as ``skinlesion.conf`` (the folder is ``conf/`` at the top)."""
