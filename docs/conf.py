"""Sphinx configuration of the asign documentation.

Build with warnings as errors::

    sphinx-build -W -b html docs docs/_build/html

Cross-references are checked (``nitpicky = True``). Intersphinx links to the libraries asign builds on are enabled
when their documentation hosts can be reached (always on Read the Docs); offline, references to those libraries
render as plain text instead of failing the build. ``ASIGN_DOCS_INTERSPHINX=0`` / ``=1`` forces them off / on.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

# -- project -------------------------------------------------------------------------------------------------------
project = "asign"
author = "asign developers"
copyright = f"{datetime.now():%Y}, {author}"
try:
    release = _version("asign")
except PackageNotFoundError:  # docs built from a checkout without installing
    release = "0.0.0"
version = ".".join(release.split(".")[:2])

# -- general -------------------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "_static/*.py"]
# ".rst" first: autosummary writes its stub pages with the first suffix, and they are reStructuredText
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
nitpicky = True
default_role = "literal"

# -- MyST and notebooks ----------------------------------------------------------------------------------------------
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image", "substitution"]
myst_heading_anchors = 3
myst_url_schemes = ["http", "https", "mailto"]
nb_execution_mode = "off"  # notebooks are committed with their outputs
nb_merge_streams = True
nb_output_stderr = "remove"

# -- API reference -------------------------------------------------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
# asign's "Returns" sections are prose (types live in the signature): render them as text, not as a type spec
napoleon_custom_sections = ["Returns"]
typehints_defaults = "braces"
always_use_bars_union = True
typehints_document_rtype = True

# -- bibliography ----------------------------------------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

# -- HTML ------------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "asign"
html_static_path = ["_static"]
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
copybutton_prompt_text = r">>> |\.\.\. |\$ |In \[\d*\]: | {2,5}\.\.\.: "
copybutton_prompt_is_regexp = True

# -- intersphinx (tolerant offline) ----------------------------------------------------------------------------------
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "xarray": ("https://docs.xarray.dev/en/stable/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "napari": ("https://napari.org/stable/", None),
}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    if host is None:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _intersphinx_mapping() -> dict[str, tuple[str, None]]:
    flag = os.environ.get("ASIGN_DOCS_INTERSPHINX", "")
    if flag == "0":
        return {}
    if flag == "1" or os.environ.get("READTHEDOCS") == "True":
        return dict(_INTERSPHINX)
    return {name: target for name, target in _INTERSPHINX.items() if _reachable(target[0])}


intersphinx_mapping = _intersphinx_mapping()
intersphinx_timeout = 10

# References into other projects: linked through intersphinx when its inventory is loaded; never an error (their
# inventories are not always complete and offline builds have none). References inside asign stay strict.
_EXTERNAL = (
    "anndata",
    "ants",
    "collections",
    "dask",
    "geopandas",
    "matplotlib",
    "mpl_toolkits",
    "napari",
    "napari_spatialdata",
    "numpy",
    "np",
    "os",
    "pandas",
    "pd",
    "pathlib",
    "scanpy",
    "scipy",
    "spatialdata",
    "squidpy",
    "torch",
    "torch_geometric",
    "typing",
    "xarray",
    "zarr",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..*)?"),
    # result containers defined in private modules (named tuples, dataclasses) are documented with their function
    (r"py:.*", r"asign\.(\w+\.)*_\w+(\.\w+)*"),
    (
        r"py:.*",
        r"(Tiles|SpatialNeighbors3D|ImageFeatures|Encoder|StackInfo|ImputeContext|ImputeResult|ASIGNFit)(\.\w+)?",
    ),
    # builtins and typing names as sphinx-autodoc-typehints renders them
    (r"py:.*", r"(Any|Literal|Callable|Sequence|Mapping|Iterable|PathLike|NDArray|ArrayLike|DataFrame|AnnData)"),
    (r"py:.*", r"(SpatialData|Figure|Axes|Colormap|Normalize|StackInfo|Path)"),
]
if not intersphinx_mapping:
    # offline: the standard library cannot be linked either
    nitpick_ignore_regex.append((r"py:.*", r"(str|int|float|bool|dict|list|tuple|None|object|type|bytes)"))

# -- optional pages --------------------------------------------------------------------------------------------------
# Pages that other parts of the project write (data contract, encoders, benchmark reports, tutorial notebooks).
# A toctree entry for one that does not exist yet (or a glob that matches nothing) is dropped, with an info message,
# instead of failing the build.
OPTIONAL_PAGES = ("contract", "encoders", "notebooks/synthetic", "notebooks/her2st_C", "*")


def _page_exists(srcdir: Path, docname: str, name: str) -> bool:
    base = (srcdir / docname).parent
    suffixes = (".md", ".ipynb", ".rst")
    if "*" in name:
        own = srcdir / docname
        return any(p.suffix in suffixes and p.with_suffix("") != own for p in base.glob(name))
    return any((base / f"{name}{suffix}").is_file() for suffix in suffixes)


def _prune_optional_pages(app, docname: str, source: list[str]) -> None:
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    srcdir = Path(app.srcdir)
    lines, in_toctree = [], False
    for line in source[0].splitlines():
        stripped = line.strip()
        if stripped.startswith(("```{toctree}", ":::{toctree}")):
            in_toctree = True
        elif in_toctree and stripped in ("```", ":::"):
            in_toctree = False
        elif in_toctree and stripped in OPTIONAL_PAGES and not _page_exists(srcdir, docname, stripped):
            log.info(f"[asign docs] optional page {stripped!r} is not written yet; left out of the toctree")
            continue
        lines.append(line)
    source[0] = "\n".join(lines) + ("\n" if source[0].endswith("\n") else "")


def setup(app) -> None:
    app.connect("source-read", _prune_optional_pages)
