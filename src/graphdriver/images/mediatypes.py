"""The media types of Docker schema 2 and the OCI image spec, and what each one is.

Owns the names only; imports nothing.
"""

from __future__ import annotations

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_FOREIGN_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_FOREIGN_LAYER_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_FOREIGN_LAYER_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

IMAGE_MANIFESTS = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEXES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
SCHEMA1 = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
CONFIGS = frozenset({DOCKER_CONFIG, OCI_CONFIG})
LAYERS = frozenset({DOCKER_LAYER_GZIP, DOCKER_FOREIGN_LAYER, OCI_LAYER, OCI_LAYER_GZIP,
                    OCI_LAYER_ZSTD, OCI_FOREIGN_LAYER, OCI_FOREIGN_LAYER_GZIP,
                    OCI_FOREIGN_LAYER_ZSTD})
FOREIGN_LAYERS = frozenset({DOCKER_FOREIGN_LAYER, OCI_FOREIGN_LAYER, OCI_FOREIGN_LAYER_GZIP,
                            OCI_FOREIGN_LAYER_ZSTD})

#: what a pull asks for, most preferred first (as containerd and containers/image send it)
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

#: compression name -> (OCI layer type, Docker layer type or None when schema 2 has none)
LAYER_TYPE_FOR = {
    "gzip": (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP),
    "zstd": (OCI_LAYER_ZSTD, None),
}
