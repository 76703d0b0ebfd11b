"""Training for the project's own models (optional extra: ``pip install -e '.[train]'``).

Not part of the installed product: ``daemon`` never imports this package.
"""
