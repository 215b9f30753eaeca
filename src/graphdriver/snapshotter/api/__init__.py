"""containerd's snapshots v1 API: the ``.proto`` files written from containerd 1.6's definitions
(gogoproto options stripped; package, names and field numbers unchanged) and the modules
generated from them by ``generate.py`` (grpcio-tools + mypy-protobuf), committed.  Nothing here
imports graphdriver."""
