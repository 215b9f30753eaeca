"""graphdriver as a containerd snapshotter (a proxy plugin over gRPC), issue 14.

``api/`` holds containerd's messages (the ``.proto`` files and their committed generated
modules), ``metadata.py`` the snapshot records (SQLite), ``filters.py`` List's filter syntax,
``service.py`` the snapshots-to-layers mapping and the RPCs, ``server.py`` the unix-socket
server and ``command.py`` the ``graphdriver snapshotter`` command.  Nothing here is imported by
the store, the drivers or the archive package; this package imports only downward.
"""
