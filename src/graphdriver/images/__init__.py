"""The image store: pull, push, load, save and commit images over a Driver (issue 13).

``ImageStore`` (store.py) is the library's entry point; the modules below it each own one job
(references, manifests, platforms, credentials, the registry client, the metadata store, the
file formats).  This package imports the store and drivers only through the Driver protocol;
the archive package and the drivers never import it.
"""

from __future__ import annotations
