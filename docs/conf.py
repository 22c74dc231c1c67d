"""Sphinx configuration of torch_mp's API reference (`make docs`, HTML in build/docs/html).

The reference is made from the docstrings of the installed package (Google style: Args, Returns,
Raises), so the package must import: `make docs` installs it first.
"""
import torch_mp

project = "torch_mp"
author = "the torch_mp authors"
release = version = torch_mp.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]

# Signatures show the annotations; the Args sections describe them.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"torch_mp {release}"
exclude_patterns = ["_build"]
